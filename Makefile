# Two commands set everything up: `make demo` and `make test`. Both create .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export OMP_NUM_THREADS ?= 2

.PHONY: venv native demo demo-run ablations default default-ablations layout layout-ablations test test-crash lint bench bench-train teacher \
	student layout-teacher layout-student blot-teacher blot-student counting counting-ablations demo-human \
	counting-teacher counting-student clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/ci.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements/ci.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# Optional native CPU kernels (kernels/csrc) built with CMake against the venv's torch.
native: venv
	cmake -S . -B build/native -DTDM_R1_PYTHON=$(CURDIR)/$(BIN)/python > /dev/null
	cmake --build build/native -j 2 > /dev/null

# The paper's two ablations and the control without the learned-reward term, each at the epoch budget of config $(1),
# into $(2)_direct_rl, $(2)_eta1 and $(2)_no_reward; then their rows are added to $(2)/report.md.
define ablation_runs
	$(BIN)/tdm-r1 train --config $(1) --set run_dir=$(2)_direct_rl --set train.generator_loss=direct_rl
	$(BIN)/tdm-r1 train --config $(1) --set run_dir=$(2)_eta1 --set train.eta=1.0
	$(BIN)/tdm-r1 train --config $(1) --set run_dir=$(2)_no_reward --set tdm.trunc_steps=0
	$(BIN)/tdm-r1 report --run $(2) --ablation direct_rl=$(2)_direct_rl --ablation eta_1=$(2)_eta1 \
		--ablation no_reward_term=$(2)_no_reward
endef

# The embedded default: TDM-R1 on the blot world (half of the teacher's last training renders have a block of ink over
# half the word) from its shipped 4-step student, on the 10,000-word stream; runs/demo/report.md opens with the
# headline (teacher 32 NFE + CFG, teacher 4 NFE, student, TDM-R1 on held-out words) and links the labelled grids.
demo:
	@t0=$$(date +%s); $(MAKE) --no-print-directory demo-run; rc=$$?; t=$$(( $$(date +%s) - t0 )); \
		echo "make demo: $$((t / 60)) min $$((t % 60)) s wall (setup, baselines, training, evaluation)"; exit $$rc

demo-run: venv native
	$(BIN)/tdm-r1 train --config configs/toy_ocr_blot_r1.yaml
	@cat runs/demo/report.md

# TDM-R1 from likes (docs/human_labels.md): the labelling page of runs/demo_human and a simulated labeller (likes text
# OCR reads exactly, one label in ten flipped) in the background while the demo's recipe trains on the `human` reward;
# an earlier runs/demo_human is moved aside first (its labels would be found again). Open the page yourself with a token
# from `tdm-r1 label --run runs/demo_human --add-labeller NAME`.
demo-human: venv native
	@if [ -e runs/demo_human ]; then mv runs/demo_human runs/demo_human.$$(date +%Y%m%d-%H%M%S); fi; \
	mkdir -p runs/demo_human; \
	$(BIN)/tdm-r1 label --run runs/demo_human --port 0 --max-seconds 7200 > runs/demo_human.label.log 2>&1 & page=$$!; \
	$(BIN)/tdm-r1 label-sim --run runs/demo_human --rule ocr_exact --flip 0.1 --max-seconds 7200 \
		> runs/demo_human.sim.log 2>&1 & sim=$$!; \
	trap 'kill $$page $$sim 2> /dev/null' EXIT; \
	$(BIN)/tdm-r1 train --config configs/toy_ocr_blot_human.yaml && cat runs/demo_human/report.md

# The paper's ablations at the demo's epoch budget (direct-RL generator loss; eta = 1 stochastic rollouts) and the
# control without the learned-reward term (KL + CFG only), added as rows to runs/demo/report.md (run `make demo` first).
ablations: venv native
	$(call ablation_runs,configs/toy_ocr_blot_r1.yaml,runs/demo)

# TDM-R1 on the default world from its shipped student, on a pool of 32 train words; writes runs/default/report.md
# with held-out rows and rows on the 32 words (docs/results/default.md).
default: venv native
	$(BIN)/tdm-r1 train --config configs/toy_ocr_r1.yaml
	@cat runs/default/report.md

default-ablations: venv native
	$(call ablation_runs,configs/toy_ocr_r1.yaml,runs/default)

# TDM-R1 on the layout world (text may be cut off at the right edge) from its shipped student, on the 10,000-word
# stream; writes runs/layout/{report.md,summary.json,...} with the held-out rows at 4 eval seeds.
layout: venv native
	$(BIN)/tdm-r1 train --config configs/toy_ocr_layout_r1.yaml
	@cat runs/layout/report.md

# The same ablations and control on the layout world, added as rows to runs/layout/report.md (run `make layout` first).
layout-ablations: venv native
	$(call ablation_runs,configs/toy_ocr_layout_r1.yaml,runs/layout)

test: venv native
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: venv native
	$(BIN)/python benchmarks/bench_ocr.py
	$(BIN)/python benchmarks/bench_kernels.py

# The crash harness with many kill points (tests/integration/test_crash.py; the default suite tries a few).
test-crash: venv native
	$(BIN)/python -m pytest -q -s -m slow tests/integration/test_crash.py

# The trainer's phases on the demo config, reference loop vs fused (docs/benchmarks.md): benchmarks/results/train_*.
bench-train: venv native
	$(BIN)/tdm-r1 bench --config configs/toy_ocr_blot_r1.yaml --epochs 2 --warmup 1

teacher: venv
	$(BIN)/tdm-r1 pretrain --config configs/toy_ocr_teacher.yaml

student: venv
	$(BIN)/tdm-r1 distill --config configs/toy_ocr_distill.yaml

# The layout world's teacher in its two stages (configs/toy_ocr_layout_teacher.yaml), and its 4-step student.
layout-teacher: venv
	$(BIN)/tdm-r1 pretrain --config configs/toy_ocr_layout_teacher.yaml
	$(BIN)/tdm-r1 pretrain --config configs/toy_ocr_layout_teacher.yaml --set run_dir=runs/toy_ocr_layout_teacher2 \
		--set pretrain.init=runs/toy_ocr_layout_teacher/teacher.safetensors --set pretrain.steps=2000 \
		--set pretrain.warmup_steps=50

layout-student: venv
	$(BIN)/tdm-r1 distill --config configs/toy_ocr_layout_distill.yaml

# The blot world's (the demo's) teacher in its three stages (configs/toy_ocr_blot_teacher.yaml), and its 4-step student.
blot-teacher: venv
	$(BIN)/tdm-r1 pretrain --config configs/toy_ocr_blot_teacher.yaml --set world.blot_prob=0.3
	$(BIN)/tdm-r1 pretrain --config configs/toy_ocr_blot_teacher.yaml --set world.blot_prob=0.3 \
		--set run_dir=runs/toy_ocr_blot_teacher2 --set pretrain.init=runs/toy_ocr_blot_teacher/teacher.safetensors \
		--set pretrain.steps=1500 --set pretrain.warmup_steps=50
	$(BIN)/tdm-r1 pretrain --config configs/toy_ocr_blot_teacher.yaml \
		--set run_dir=runs/toy_ocr_blot_teacher3 --set pretrain.init=runs/toy_ocr_blot_teacher2/teacher.safetensors \
		--set pretrain.steps=1000 --set pretrain.warmup_steps=50

blot-student: venv
	$(BIN)/tdm-r1 distill --config configs/toy_ocr_blot_distill.yaml

# The counting world (docs/results/counting.md): TDM-R1 from the shipped 4-step student with the strict count reward,
# the held-out rows at 4 eval seeds, then how each model counts (tools/counting_probe.py) into runs/counting/probe.md.
counting: venv native
	$(BIN)/tdm-r1 train --config configs/toy_counting_r1.yaml
	rm -f runs/counting/probe.md
	$(BIN)/python tools/counting_probe.py --checkpoint checkpoints/toy_counting_teacher.safetensors --nfe 32 --cfg 4.5 \
		--seed 1234 --markdown runs/counting/probe.md --label "teacher, 32 NFE + CFG 4.5"
	$(BIN)/python tools/counting_probe.py --checkpoint checkpoints/toy_counting_teacher.safetensors --seed 1234 --seeds 4 \
		--adapter checkpoints/toy_counting_student_adapter.safetensors --markdown runs/counting/probe.md \
		--label "student, 4 NFE"
	$(BIN)/python tools/counting_probe.py --checkpoint runs/counting/generator.safetensors --seed 1234 --seeds 4 \
		--markdown runs/counting/probe.md --label "TDM-R1, 4 NFE"
	@cat runs/counting/report.md runs/counting/probe.md

counting-ablations: venv native
	$(call ablation_runs,configs/toy_counting_r1.yaml,runs/counting)

# The counting world's teacher (three stages, each from the last one's weights: configs/toy_counting_teacher_base.yaml,
# configs/toy_counting_teacher_stage2.yaml, configs/toy_counting_teacher.yaml) and its 4-step student.
counting-teacher: venv
	$(BIN)/tdm-r1 pretrain --config configs/toy_counting_teacher_base.yaml
	$(BIN)/tdm-r1 pretrain --config configs/toy_counting_teacher_stage2.yaml
	$(BIN)/tdm-r1 pretrain --config configs/toy_counting_teacher.yaml

counting-student: venv
	$(BIN)/tdm-r1 distill --config configs/toy_counting_distill.yaml

clean:
	rm -rf $(VENV) .cache build
