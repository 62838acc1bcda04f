#!/usr/bin/env bash
# The GPU check of omnitrain, for one CUDA machine with torch, triton, transformers and peft:
#   1. the fused LoRA kernels: bf16 GPU tests + benchmark at 7B shapes   (profiling/gpu/lora.sh)
#   2. fused linear cross-entropy: bf16 GPU tests + benchmark at 7B head (profiling/gpu/linear_cross_entropy.sh)
#      + packing/attention backends and Liger ops: bf16 GPU tests (tests/engine/test_attention.py -m gpu)
#   3. bench_train --preset 7b: omnitrain against HF Trainer + PEFT, few steps (padded batches)
#   4. bench_train --preset 7b --packing on: omnitrain on packed rows of the same samples, its own
#      stage (a third 7B build does not fit beside the other two in bench_train's time)
#   5. one short table (profiling/gpu_summary.py), printed last.
#
#   bash profiling/gpu_check.sh OUT_DIR                   # run from anywhere; about 8 minutes at most
#   GPU_CHECK_DRY=1 bash profiling/gpu_check.sh OUT_DIR   # CPU smoke run of the same structure
#
# Everything lands in OUT_DIR: one log per stage, stages.jsonl (status, exit code, seconds),
# bench_lora.json, bench_linear_cross_entropy.json, bench_train.json, bench_train_packed.json
# (+ bench_train.csv), summary.json. A failing or timed-out stage is recorded and the next one runs.
# Settings (environment):
#   PYTHON                 interpreter (default: python)
#   GPU_CHECK_BUDGET_S     total seconds for all stages (default 470: under 8 minutes with set-up)
#   GPU_CHECK_BENCH_S      seconds kept for bench_train (default 200: two 7B builds + 8 steps each)
#   GPU_CHECK_PACKED_S     seconds kept for bench_train_packed (default 110: one 7B build + 8 steps)
#   GPU_CHECK_DRY=1        no GPU needed: fragments are syntax-checked only, bench_train runs the
#                          tiny preset for 1 step, the summary is built as on a GPU.
set -u

if [ $# -lt 1 ]; then
    echo "usage: bash profiling/gpu_check.sh OUT_DIR   (GPU_CHECK_DRY=1 for a CPU smoke run)" >&2
    exit 2
fi
mkdir -p "$1" || { echo "gpu_check: cannot create output folder $1" >&2; exit 2; }
OUT_DIR="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.." || exit 2
PYTHON="${PYTHON:-python}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
BENCH_S="${GPU_CHECK_BENCH_S:-200}"
PACKED_S="${GPU_CHECK_PACKED_S:-110}"
DRY="${GPU_CHECK_DRY:-0}"
START_S=$(date +%s)
STAGES="$OUT_DIR/stages.jsonl"
: > "$STAGES"
# Stages that need less than this many seconds are not worth starting.
MIN_STAGE_S=20

say() { echo "[gpu_check] $*"; }
elapsed() { echo $(( $(date +%s) - START_S )); }

# record NAME STATUS RC SECONDS NOTE
record() {
    local note="${5//\"/\'}"
    printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "log": "%s", "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$OUT_DIR/$1.log" "$note" >> "$STAGES"
}

# run_stage NAME MAX_S RESERVE_S COMMAND...: at most MAX_S, leaving RESERVE_S of the budget to later stages.
run_stage() {
    local name="$1" max_s="$2" reserve_s="$3"
    shift 3
    local left=$(( BUDGET_S - $(elapsed) - reserve_s ))
    local limit=$(( max_s < left ? max_s : left ))
    if [ "$limit" -lt "$MIN_STAGE_S" ]; then
        say "$name: skipped, ${limit}s left of the ${BUDGET_S}s budget"
        record "$name" skipped 0 0 "out of time budget"
        return 1
    fi
    say "$name: running (limit ${limit}s, log $OUT_DIR/$name.log)"
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    case "$rc" in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    local secs=$(( $(date +%s) - t0 ))
    # The last pytest summary line (e.g. "12 passed, 1 failed in 40.1s") says more than an exit code.
    local note
    note=$(grep -E '^=*\s*[0-9]+ (passed|failed|skipped|error)' "$OUT_DIR/$name.log" | tail -1 | tr -d '=' | sed 's/^ *//')
    record "$name" "$status" "$rc" "$secs" "$note"
    say "$name: $status (exit $rc, ${secs}s) $note"
    [ "$rc" -eq 0 ]
}

# --- packages -----------------------------------------------------------------------------
missing_required=""
for pkg in torch triton transformers peft accelerate; do
    "$PYTHON" -c "import $pkg" > /dev/null 2>&1 || missing_required="$missing_required $pkg"
done
missing_optional=""
for pkg in liger_kernel flash_attn numba webdataset soundfile soxr jiwer rouge_score; do
    "$PYTHON" -c "import $pkg" > /dev/null 2>&1 || missing_optional="$missing_optional $pkg"
done
"$PYTHON" - > "$OUT_DIR/env.json" 2> /dev/null <<'EOF'
import json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
except Exception as e:
    info["torch_error"] = str(e)
for name in ("triton", "transformers", "peft", "accelerate", "liger_kernel", "flash_attn"):
    try:
        info[name] = __import__(name).__version__
    except Exception:
        info[name] = None
print(json.dumps(info, indent=1))
EOF
if [ -n "$missing_optional" ]; then
    say "optional packages missing (their parts are skipped or fall back):$missing_optional"
    say "  liger_kernel: the Liger baseline of the cross-entropy benchmark; flash_attn: sdpa is used;"
    say "  numba/webdataset/soundfile/soxr/jiwer/rouge_score: not used by these stages"
fi
record packages "$([ -z "$missing_required" ] && echo ok || echo failed)" 0 0 \
    "required missing:${missing_required:- none}; optional missing:${missing_optional:- none}"
if [ -n "$missing_required" ]; then
    say "required packages missing:$missing_required -- install them (pip install -e .) and rerun"
    "$PYTHON" -m profiling.gpu_summary "$OUT_DIR" 2> /dev/null
    exit 2
fi
if [ "$DRY" != "1" ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA device visible to torch: run on a GPU machine, or GPU_CHECK_DRY=1 for a CPU smoke run"
    record cuda failed 1 0 "torch.cuda.is_available() is False"
    "$PYTHON" -m profiling.gpu_summary "$OUT_DIR"
    exit 2
fi

# --- 1-2. kernel tests and benchmarks (fragments owned by the kernel files) ---------------------
export PYTHON
export RUN_DIR="$OUT_DIR"
run_fragment() {  # run_fragment NAME MAX_S
    local script="profiling/gpu/$1.sh"
    if [ ! -f "$script" ]; then
        say "$1: skipped, $script not found"
        record "$1" skipped 0 0 "$script not found"
        return
    fi
    if [ "$DRY" = "1" ]; then
        run_stage "$1_syntax_only" 60 "$(( BENCH_S + PACKED_S ))" bash -n "$script"
    else
        run_stage "$1" "$2" "$(( BENCH_S + PACKED_S ))" bash "$script"
    fi
}
run_fragment lora 200
run_fragment linear_cross_entropy 150
# Packing and attention backends (flash_attn / torch varlen) and Liger's ops, bf16 on the GPU.
if [ "$DRY" != "1" ]; then
    run_stage attention_gpu_tests 60 "$(( BENCH_S + PACKED_S ))" "$PYTHON" -m pytest tests/engine/test_attention.py -m gpu -q -x -p no:cacheprovider
fi

# --- 3. end to end: bench_train at the 7b preset ---------------------------------------------
if [ "$DRY" = "1" ]; then
    SIZE_ARGS=(--preset tiny --steps 1 --warmup 1 --budget 256)
else
    SIZE_ARGS=(--preset 7b --steps 6 --warmup 2)
fi
# The baseline first (no autotuning, predictable), then ours in the rest of the stage: a variant
# that overruns is killed by bench_train itself and the other's numbers are kept.
BENCH_ARGS=("${SIZE_ARGS[@]}" --variants baseline,ours --timeout $(( BENCH_S - 15 )))
CKPT_ARGS=()
if ! run_stage bench_train "$BENCH_S" "$PACKED_S" "$PYTHON" -m profiling.bench_train "${BENCH_ARGS[@]}" \
        --json "$OUT_DIR/bench_train.json" --csv "$OUT_DIR/bench_train.csv" --run-dir "$OUT_DIR/bench_train_run"; then
    # Most likely out of memory without activation checkpointing: measure with it, if time is left.
    CKPT_ARGS=(--gradient-checkpointing)
    run_stage bench_train_ckpt "$BENCH_S" "$PACKED_S" "$PYTHON" -m profiling.bench_train "${BENCH_ARGS[@]}" \
        "${CKPT_ARGS[@]}" --json "$OUT_DIR/bench_train_ckpt.json" --csv "$OUT_DIR/bench_train.csv"
fi

# --- 4. the same samples packed: ours on packed rows (padding-free), one more 7B build ----------
# Same batches as stage 3 (same seed and budget), packed per step; compared with stage 3's ours.
run_stage bench_train_packed "$PACKED_S" 0 "$PYTHON" -m profiling.bench_train "${SIZE_ARGS[@]}" ${CKPT_ARGS[@]+"${CKPT_ARGS[@]}"} \
    --variants ours --packing on --timeout $(( PACKED_S - 15 )) \
    --json "$OUT_DIR/bench_train_packed.json" --csv "$OUT_DIR/bench_train.csv" --run-dir "$OUT_DIR/bench_train_packed_run"
# Large and rebuilt on every run: the replayed batches, ours' end-of-run checkpoint and adapter.
for run in bench_train_run bench_train_packed_run; do
    rm -rf "$OUT_DIR/$run"/batches*.pt "$OUT_DIR/$run"/ours*/checkpoints "$OUT_DIR/$run"/ours*/adapter
done

# --- 5. the table, last --------------------------------------------------------------------------
say "done in $(elapsed)s; files in $OUT_DIR"
"$PYTHON" -m profiling.gpu_summary "$OUT_DIR"
