#!/usr/bin/env bash
# The GPU check, on one CUDA GPU in about 8 minutes: the gpu-marked tests, the fused kernels at real latent sizes
# (SD3.5-M / Z-Image at 512 px, 12 samples per GPU: 16 x 64 x 64 x 12 elements; and 1024 px) in bf16 with their % of
# the card's copy bandwidth, and the trainer's phase benchmark on SD3.5-M and Z-Image-Turbo with random weights at the
# recipes' per-GPU batch. Each step has its own time limit; one summary table at the end
# (benchmarks/results/gpu_check/summary.md), every step's log beside it.
#
#     bash benchmarks/gpu_check.sh            # PYTHON=... to choose the interpreter (default .venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT=benchmarks/results/gpu_check
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
status=0

step() {  # name, time limit (s), command...
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || status=1
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$OUT/steps.tsv"
    tail -n 3 "$OUT/$name.log"
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')" || exit 2
step tests 150 "$PY" -m pytest -q -m gpu tests
step kernels 100 "$PY" benchmarks/bench_kernels.py --dtype bf16 --sizes 786432,3145728 --json "$OUT/kernels.json"
for recipe in sd35m_ocr zimage_turbo_ocr; do
    step "$recipe" 120 "$PY" -m tdm_r1 bench --config "configs/$recipe.yaml" --random-init --micro-batches 2 \
        --paths fused,fast --epochs 1 --warmup 1 --out "$OUT/$recipe"
done
"$PY" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
exit $status
