# Fused LoRA kernels (kernels/lora.py, kernels/lora_grouped.py) on a CUDA machine: the bf16 GPU
# tests, then the benchmark at the 7B thinker shapes (bf16, r=16, dropout 0 and 0.05,
# 4096/8192/16384 tokens) against PEFT eager, the reference under torch.compile and the GEMM-only
# bound.
# Meant to be sourced or run by profiling/gpu_check.sh from the repository root; about 4-6 minutes
# on an H100 by estimate, not yet measured (most of it Triton autotuning and torch.compile on a
# fresh machine).
#   PYTHON   interpreter (default: python)
#   RUN_DIR  where the benchmark JSON goes (default: runs/gpu_check)
PYTHON="${PYTHON:-python}"
RUN_DIR="${RUN_DIR:-runs/gpu_check}"
mkdir -p "$RUN_DIR"
"$PYTHON" -m pytest tests/kernels/test_lora.py tests/kernels/test_lora_grouped.py -m gpu -q -x --timeout=300 -p no:cacheprovider
"$PYTHON" -m profiling.bench_lora --tokens 4096 8192 16384 --dropout 0.0 0.05 --json "$RUN_DIR/bench_lora.json"
