# Fused linear + cross-entropy (kernels/linear_cross_entropy.py) on a CUDA machine: the bf16 GPU
# tests (triton and reference against torch's cross-entropy, frozen and trainable lm_head, up to
# V=152064), then the benchmark at Qwen2.5-Omni's head (H=3584, V=152064, bf16, T=4096 and 16384,
# frozen and trainable) against naive (logits then F.cross_entropy), Liger-Kernel's
# LigerFusedLinearCrossEntropyLoss and the GEMM-FLOP bound at the measured matmul rate.
# Meant to be sourced or run by profiling/gpu_check.sh from the repository root; about 2-4 minutes
# on an H100 (naive at T=16384 alone holds ~25 GB of fp32 logits and gradients).
#   PYTHON   interpreter (default: python)
#   RUN_DIR  where the benchmark JSON goes (default: runs/gpu_check)
PYTHON="${PYTHON:-python}"
RUN_DIR="${RUN_DIR:-runs/gpu_check}"
mkdir -p "$RUN_DIR"
"$PYTHON" -m pytest tests/kernels/test_linear_cross_entropy.py -m gpu -q -x --timeout=300 -p no:cacheprovider
"$PYTHON" -m profiling.bench_linear_cross_entropy --device cuda --tokens 4096 16384 \
    --json "$RUN_DIR/bench_linear_cross_entropy.json"
