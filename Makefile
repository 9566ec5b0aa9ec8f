# Two commands set everything up: `make demo` and `make test`. Both create .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export OMP_NUM_THREADS ?= 2

.PHONY: venv demo test lint bench teacher clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/ci.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements/ci.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: venv
	$(BIN)/tdm-r1 eval --checkpoint checkpoints/toy_ocr_teacher.safetensors --split heldout --nfe 32 --cfg 3.0 \
		--out runs/demo/teacher_32nfe_cfg.json

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv
	$(BIN)/python benchmarks/bench_ocr.py

teacher: venv
	$(BIN)/tdm-r1 pretrain --config configs/toy_ocr_teacher.yaml

clean:
	rm -rf $(VENV) .cache build
