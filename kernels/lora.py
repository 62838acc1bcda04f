"""Fused LoRA: y = x W^T + b + s * (x~ A^T) B^T, with x~ = m * x / (1 - p) and W, b frozen.

Shapes (PEFT orientation): x [..., K], W [N, K], b [N], A [r, K], B [N, r], keep mask m [M, K].
Gradients: dB = s dy^T (x~ A^T); dA = s (dy B)^T x~; dx = dy W + (m / (1 - p)) * s (dy B) A.

What an unfused LoRA (PEFT) spends beyond the base GEMMs, and what the Triton path does instead:
- the dropout copy of x: the mask is drawn on the fly inside the kernels from (seed, row, col)
  with Triton's Philox and regenerated in backward, never stored;
- the [M, N] LoRA output written and read again: the rank-r product is written into y first
  and the base GEMM accumulates into it (cuBLAS beta=1); in backward dy W is computed by
  cuBLAS and one Triton kernel adds the masked rank-r term into dx in place;
- x A^T ([M, r]) is the only activation kept besides x.
impl="triton_gemm" goes one step further (LoRAFusion, arXiv 2510.00206): the base GEMMs run in
Triton with the rank-r term as the accumulator's starting value (forward) or masked into it
(backward dx), so y and dx are written once and never re-read. Which of the two is faster on a
device is for profiling/bench_lora.py to show; "auto" takes "triton" until then.
`LoRAGroupFunction` runs G projections of one x with their adapters side by side (x read once);
`lora_linear` is its G = 1 case, and kernels/lora_grouped.py builds `lora_qkv` and `lora_mlp` on it.

The PyTorch reference (`lora_linear_reference`, ...) is the same math in plain autograd and
draws the same mask (`dropout_keep_mask`, Philox in torch), so both implementations agree
with dropout on. The triton path needs CUDA, or TRITON_INTERPRET=1 (tests on CPU).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # triton is a Linux-only dependency; the reference path runs without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None

# triton: step-1 kernels around cuBLAS GEMMs; triton_gemm: the base GEMMs in Triton with the
# rank-r term in their accumulator. "auto" picks triton on CUDA until a GPU benchmark
# (profiling/bench_lora.py) shows triton_gemm faster on the device.
# reference: the same math in PyTorch with the kernels' own Philox mask, bit for bit (what the
# kernels are tested against; the mask costs ~100 integer ops per element in PyTorch).
# torch: the same math with the mask drawn by torch's RNG from the same seed (one bernoulli
# pass): what "auto" runs without CUDA, where no kernel result needs matching (measured on
# the tiny model on CPU: a LoRA step with dropout 0.05 took 2x the dropout-free step with the
# Philox mask).
IMPLS = ("auto", "triton", "triton_gemm", "reference", "torch")
# Philox keys are taken modulo 2**31 so that every seed reaches the kernels as a 32-bit int.
SEED_MODULUS = 2**31


def resolve_lora_impl(impl: str, device) -> str:
    """Turn the recipe's `lora.impl` into "triton" or "reference" for tensors on `device`."""
    if impl not in IMPLS:
        raise ValueError(f"lora.impl={impl!r} is not known; use one of {', '.join(IMPLS)}.")
    on_cuda = torch.device(device).type == "cuda"
    if impl == "auto":
        return "triton" if on_cuda else "torch"
    if impl.startswith("triton") and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"lora.impl={impl} needs a CUDA device (tensors are on {device}); "
            "use lora.impl=reference or auto on CPU, or set TRITON_INTERPRET=1 to run the kernels interpreted."
        )
    return impl


def _check_seed(dropout_p: float, seed) -> int:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"LoRA dropout_p={dropout_p} must be in [0, 1).")
    if dropout_p == 0.0:
        return 0
    if seed is None:
        # Drawn from torch's CPU RNG, so torch.manual_seed and activation checkpointing
        # (which restores the RNG state on recompute) replay the same mask.
        return int(torch.randint(0, SEED_MODULUS, (1,)).item())
    # Philox keys are 32-bit here; larger seeds map onto that range deterministically.
    return int(seed) % SEED_MODULUS


# ----------------------------------------------------------------------------- dropout mask
def dropout_keep_mask(seed: int, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    """The keep mask the kernels draw, as a bool [rows, cols] tensor, computed in PyTorch.

    Element (m, k) is kept when output k % 4 of Triton's `tl.rand4x(seed, (m << 32) | (k // 4))`
    is >= p: Philox-4x32-10 with key (seed_lo, seed_hi) and counter (k // 4, m, 0, 0), mapped to
    [0, 1) as triton.language.random.uint_to_uniform_float does. 32-bit words live in int64;
    a product of two words (< 2**64) wraps in int64 but keeps its exact low 64 bits.
    """
    mask32 = 0xFFFFFFFF
    groups = (cols + 3) // 4
    c0 = torch.arange(groups, device=device, dtype=torch.int64).repeat(rows)
    c1 = torch.arange(rows, device=device, dtype=torch.int64).repeat_interleave(groups)
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    # The key as 0-d tensors, not Python ints: under torch.compile(dynamic=True) the seed is a
    # symbolic int, and inductor cannot generate code for bitwise ops on those.
    seed_t = torch.tensor(seed, dtype=torch.int64, device=device)
    k0, k1 = seed_t & mask32, (seed_t >> 32) & mask32
    for _ in range(10):  # triton.language.random.N_ROUNDS_DEFAULT
        prod_b, prod_a = c2 * 0xCD9E8D57, c0 * 0xD2511F53
        c0, c2 = ((prod_b >> 32) & mask32) ^ c1 ^ k0, ((prod_a >> 32) & mask32) ^ c3 ^ k1
        c1, c3 = prod_b & mask32, prod_a & mask32
        k0, k1 = (k0 + 0x9E3779B9) & mask32, (k1 + 0xBB67AE85) & mask32
    words = torch.stack([c0, c1, c2, c3], dim=1).reshape(rows, groups * 4)[:, :cols]
    signed = torch.where(words >= 2**31, words - 2**32, words)
    signed = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    uniform = signed.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=device)
    return uniform >= torch.tensor(dropout_p, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------- Triton kernels
# tl.dot on 16-bit inputs needs an inner/outer dimension of at least 16 on NVIDIA GPUs
# (DESIGN.md, known traps): ranks below that are padded to 16 inside the kernels, masked.
MIN_DOT_DIM = 16
# One fixed, small config for TRITON_INTERPRET (no autotuning there): few programs, few loop
# trips, since the interpreter's cost is per block operation.
INTERPRETED_BLOCKS = {"BLOCK_M": 32, "BLOCK_K": 64}
# dA = gB^T x~ reduces over M: rows are split into chunks whose partial sums land in an fp32
# buffer [splits, R, K] summed afterwards (deterministic, unlike atomics). 512 rows per chunk
# give 32 chunks at M=16384: ~900 programs at K=3584, a 39 MB buffer at r=16, K=18944
# (PEFT's stored dropout copy of that input is 620 MB).
DA_ROWS_PER_SPLIT = 512
DA_MAX_SPLITS = 64
# The fused GEMM (LoRAFusion-style: the rank-r product starts the accumulator of the base GEMM).
INTERPRETED_GEMM_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}
GEMM_GROUP_M = 8  # programs sweep 8 row-blocks per column-block so W tiles stay in L2
# Below this many rows tuning cannot pay for its compilations (each config is compiled and
# timed): small problems, as in the GPU tests, take the smallest tile config untuned.
TUNE_MIN_ROWS = 1024

if triton is not None:
    def _tile_configs(blocks):
        return [triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s) for m, k, w, s in blocks]

    # Hopper-sized tiles included (128 x 128, 8 warps); these kernels are memory-bound with r <= 64.
    _CUDA_CONFIGS = _tile_configs([(32, 128, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)])

    @triton.jit
    def _keep(seed, rows, col_start, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # One Philox call yields four uniforms: element (m, k) takes output k % 4 of counter
        # (k // 4, m), so a [BLOCK_M, BLOCK_K] tile costs BLOCK_M * BLOCK_K / 4 calls. The
        # counter depends on (m, k) only, not on the tensor's width, strides or the tiling.
        groups = col_start // 4 + tl.arange(0, BLOCK_K // 4)
        offsets = (rows.to(tl.int64)[:, None] << 32) | groups.to(tl.int64)[None, :]
        u0, u1, u2, u3 = tl.rand4x(seed, offsets)
        uniform = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (BLOCK_M, BLOCK_K))
        return uniform >= p

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:  # fp32 inputs: full precision, as the reference (no TF32)
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _keep_mask_kernel(out_ptr, rows_n, cols_n, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        inside = (rows[:, None] < rows_n) & (cols[None, :] < cols_n)
        keep = _keep(seed, rows, tl.program_id(1) * BLOCK_K, p, BLOCK_M, BLOCK_K)
        tl.store(out_ptr + rows[:, None] * cols_n + cols[None, :], keep.to(tl.int8), mask=inside)

    @triton.jit
    def _lora_down_kernel(x_ptr, a_ptr, xa_ptr, M, K, R, s_xm, s_xk, s_ar, s_ak, s_om, s_or, seed, p, out_scale, rows_class,
                          HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """xa[M, R] = out_scale * (m * x) @ A^T; the dropped x is never written."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        ranks = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * s_xm + cols[None, :] * s_xk,
                        mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
            if HAS_DROPOUT:
                x = tl.where(_keep(seed, rows, k0, p, BLOCK_M, BLOCK_K), x, 0.0)
            a_t = tl.load(a_ptr + ranks[None, :] * s_ar + cols[:, None] * s_ak,
                          mask=(ranks[None, :] < R) & (cols[:, None] < K), other=0.0)
            acc = _dot(x, a_t, acc, IEEE)
        out = (acc * out_scale).to(xa_ptr.dtype.element_ty)
        tl.store(xa_ptr + rows.to(tl.int64)[:, None] * s_om + ranks[None, :] * s_or, out,
                 mask=(rows[:, None] < M) & (ranks[None, :] < R))

    @triton.jit
    def _lora_dx_kernel(dx_ptr, gb_ptr, a_ptr, M, K, R, s_dm, s_dk, s_gm, s_gr, s_ar, s_ak, seed, p, out_scale, rows_class,
                        HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """dx += out_scale * m * (gB @ A), in place: no [M, K] temporary."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        ranks = tl.arange(0, BLOCK_R)
        gb = tl.load(gb_ptr + rows.to(tl.int64)[:, None] * s_gm + ranks[None, :] * s_gr,
                     mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * s_ar + cols[None, :] * s_ak,
                    mask=(ranks[:, None] < R) & (cols[None, :] < K), other=0.0)
        update = _dot(gb, a, tl.zeros((BLOCK_M, BLOCK_K), tl.float32), IEEE) * out_scale
        if HAS_DROPOUT:
            update = tl.where(_keep(seed, rows, tl.program_id(1) * BLOCK_K, p, BLOCK_M, BLOCK_K), update, 0.0)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        dx_ptrs = dx_ptr + rows.to(tl.int64)[:, None] * s_dm + cols[None, :] * s_dk
        dx = tl.load(dx_ptrs, mask=inside, other=0.0).to(tl.float32)
        tl.store(dx_ptrs, (dx + update).to(dx_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _lora_grad_a_kernel(part_ptr, gb_ptr, x_ptr, M, K, R, rows_per_split, s_gm, s_gr, s_xm, s_xk, seed, p,
                            out_scale, rows_class, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """part[split, R, K] = out_scale * gB[rows]^T @ (m * x)[rows] over one chunk of rows."""
        cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        split = tl.program_id(1)
        ranks = tl.arange(0, BLOCK_R)
        row_start = split * rows_per_split
        row_end = tl.minimum(row_start + rows_per_split, M)
        acc = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            gb_t = tl.load(gb_ptr + rows.to(tl.int64)[None, :] * s_gm + ranks[:, None] * s_gr,
                           mask=(rows[None, :] < row_end) & (ranks[:, None] < R), other=0.0)
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * s_xm + cols[None, :] * s_xk,
                        mask=(rows[:, None] < row_end) & (cols[None, :] < K), other=0.0)
            if HAS_DROPOUT:
                x = tl.where(_keep(seed, rows, tl.program_id(0) * BLOCK_K, p, BLOCK_M, BLOCK_K), x, 0.0)
            acc = _dot(gb_t, x, acc, IEEE)
        tl.store(part_ptr + split.to(tl.int64) * R * K + ranks[:, None] * K + cols[None, :], acc * out_scale,
                 mask=(ranks[:, None] < R) & (cols[None, :] < K))

    # `rows_class` (0: fewer rows than TUNE_MIN_ROWS, 1: more; unused by the kernels) is in the
    # tuning key, so a small first call does not fix the config of every later, large one.
    def _untuned_when_small(configs, named_args, **kwargs):
        if named_args["rows_class"]:
            return configs
        if kwargs.get("IEEE") and kwargs.get("BLOCK_R", 0) >= FP32_WIDE_RANK_BLOCK:
            return [_FP32_WIDE_RANK_GEMM_CONFIG if "BLOCK_N" in configs[0].kwargs else _FP32_WIDE_RANK_TILE_CONFIG]
        return [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs.get("BLOCK_N", 1), c.kwargs["BLOCK_K"]))]

    # fp32 with a wide rank block (grouped q/k/v or gate/up at rank >= 64 pad r to 128-256): the
    # smallest tuned config needs 240-448 KiB of shared memory there (profiling/compile_check.py,
    # sm_90, limit 227 KiB); these fit (tile: 40-76 KiB measured). Autotuned (large) problems skip
    # such configs themselves: Triton's autotuner drops configs that run out of resources.
    FP32_WIDE_RANK_BLOCK = 128
    _FP32_WIDE_RANK_TILE_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=3)
    _FP32_WIDE_RANK_GEMM_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)

    _PRUNE = {"early_config_prune": _untuned_when_small}
    _TUNE_KEY = ["K", "BLOCK_R", "HAS_DROPOUT", "rows_class"]
    _lora_down_tuned = triton.autotune(_CUDA_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)(_lora_down_kernel)
    _lora_dx_tuned = triton.autotune(_CUDA_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE,
                                     restore_value=["dx_ptr"])(_lora_dx_kernel)
    _lora_grad_a_tuned = triton.autotune(_CUDA_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)(_lora_grad_a_kernel)

    # Hopper-sized GEMM tiles (as in Triton's matmul tutorial for sm90), plus a smaller one for N=512.
    # Few configs: each costs a compilation per kernel variant on a fresh machine.
    _GEMM_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
                     for m, n, k, w, st in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3),
                                            (64, 128, 64, 4, 4)]]

    @triton.jit
    def _lora_gemm_kernel(a_ptr, b_ptr, l_ptr, r_ptr, bias_ptr, c_ptr, out_ptr, M, N, Kred, R,
                          s_am, s_ak, s_bk, s_bn, s_lm, s_lr, s_rr, s_rn, s_cm, s_cn, s_om, s_on, seed, p, lora_scale, rows_class,
                          HAS_BIAS: tl.constexpr, HAS_C: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out = a @ b + lora_scale * [m *] (l @ r) [+ bias] [+ c]; the rank-r term seeds the accumulator.

        Forward: a = x, b = W^T, l = x~ A^T, r = B^T. Backward: a = dy, b = W, l = dy B, r = A, masked.
        """
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
        pid_n = (pid % (GROUP_M * num_n)) // group_size
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, BLOCK_R)
        left = tl.load(l_ptr + rows.to(tl.int64)[:, None] * s_lm + ranks[None, :] * s_lr,
                       mask=(rows[:, None] < M) & (ranks[None, :] < R), other=0.0)
        right = tl.load(r_ptr + ranks[:, None] * s_rr + cols[None, :] * s_rn,
                        mask=(ranks[:, None] < R) & (cols[None, :] < N), other=0.0)
        acc = _dot(left, right, tl.zeros((BLOCK_M, BLOCK_N), tl.float32), IEEE) * lora_scale
        if MASKED:
            acc = tl.where(_keep(seed, rows, pid_n * BLOCK_N, p, BLOCK_M, BLOCK_N), acc, 0.0)
        for k0 in range(0, Kred, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * s_am + ks[None, :] * s_ak,
                        mask=(rows[:, None] < M) & (ks[None, :] < Kred), other=0.0)
            b = tl.load(b_ptr + ks.to(tl.int64)[:, None] * s_bk + cols[None, :] * s_bn,
                        mask=(ks[:, None] < Kred) & (cols[None, :] < N), other=0.0)
            acc = _dot(a, b, acc, IEEE)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_C:
            acc += tl.load(c_ptr + rows.to(tl.int64)[:, None] * s_cm + cols[None, :] * s_cn, mask=inside,
                           other=0.0).to(tl.float32)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * s_om + cols[None, :] * s_on,
                 acc.to(out_ptr.dtype.element_ty), mask=inside)

    _lora_gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=["N", "Kred", "BLOCK_R", "HAS_C", "MASKED", "rows_class"],
                                       prune_configs_by=_PRUNE)(_lora_gemm_kernel)


def _require_triton():
    if triton is None:
        raise RuntimeError("lora.impl=triton needs the triton package (Linux); use lora.impl=reference.")


def _launch(kernel, tuned, grid, device, *args, **constexprs):
    """Autotuned on CUDA; one fixed small config under the interpreter."""
    if device.type == "cuda":
        tuned[grid](*args, **constexprs)
    else:
        kernel[grid(INTERPRETED_BLOCKS)](*args, **constexprs, **INTERPRETED_BLOCKS)


def _rows_class(rows: int) -> int:
    return int(rows >= TUNE_MIN_ROWS)


def _rank_block(rank: int) -> int:
    return max(MIN_DOT_DIM, triton.next_power_of_2(rank))


def _dropout_args(dropout_p: float, seed: int):
    keep_scale = 1.0 / (1.0 - dropout_p)
    return dict(HAS_DROPOUT=dropout_p > 0.0), keep_scale


def lora_down(x2d, lora_A, dropout_p, seed):
    """x~ A^T as [M, r] in x's dtype (fp32 accumulation)."""
    _require_triton()
    M, K = x2d.shape
    R = lora_A.shape[0]
    xa = torch.empty(M, R, device=x2d.device, dtype=x2d.dtype)
    flags, keep_scale = _dropout_args(dropout_p, seed)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _launch(_lora_down_kernel, _lora_down_tuned, grid, x2d.device, x2d, lora_A, xa, M, K, R, *x2d.stride(),
            *lora_A.stride(), *xa.stride(), seed, dropout_p, keep_scale, _rows_class(M), IEEE=x2d.dtype == torch.float32,
            BLOCK_R=_rank_block(R), **flags)
    return xa


def lora_add_dx(dx, gB, lora_A, scale, dropout_p, seed):
    """dx += scale * m / (1 - p) * (gB @ A), in place."""
    _require_triton()
    M, K = dx.shape
    R = lora_A.shape[0]
    flags, keep_scale = _dropout_args(dropout_p, seed)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]))
    _launch(_lora_dx_kernel, _lora_dx_tuned, grid, dx.device, dx, gB, lora_A, M, K, R, *dx.stride(), *gB.stride(),
            *lora_A.stride(), seed, dropout_p, scale * keep_scale, _rows_class(M), IEEE=dx.dtype == torch.float32,
            BLOCK_R=_rank_block(R), **flags)
    return dx


def lora_grad_A(gB, x2d, scale, dropout_p, seed, splits=None):
    """dA = scale / (1 - p) * gB^T @ (m * x), fp32 [r, K]; `splits` chunks of rows reduce in parallel."""
    _require_triton()
    M, K = x2d.shape
    R = gB.shape[1]
    if splits is None:
        splits = min(max(1, triton.cdiv(M, DA_ROWS_PER_SPLIT)), DA_MAX_SPLITS) if x2d.device.type == "cuda" else 1
    rows_per_split = triton.cdiv(M, splits)
    partial = torch.empty(splits, R, K, device=x2d.device, dtype=torch.float32)
    flags, keep_scale = _dropout_args(dropout_p, seed)
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), splits)
    _launch(_lora_grad_a_kernel, _lora_grad_a_tuned, grid, x2d.device, partial, gB, x2d, M, K, R, rows_per_split,
            *gB.stride(), *x2d.stride(), seed, dropout_p, scale * keep_scale, _rows_class(M), IEEE=x2d.dtype == torch.float32,
            BLOCK_R=_rank_block(R), **flags)
    return partial[0] if splits == 1 else partial.sum(0)


def lora_gemm(a, b, left, right, lora_scale, bias=None, accumulate=None, dropout_p=0.0, seed=0):
    """a @ b + lora_scale * m / (1 - p) * (left @ right) [+ bias] [+ accumulate] in one Triton GEMM.

    `b` and `right` may be transposed views (strides are passed): W^T and B^T cost no copy.
    """
    _require_triton()
    M, Kred = a.shape
    N, R = b.shape[1], left.shape[1]
    out = torch.empty(M, N, device=a.device, dtype=a.dtype)
    flags, keep_scale = _dropout_args(dropout_p, seed)
    c = accumulate if accumulate is not None else out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    args = (a, b, left, right, bias if bias is not None else out, c, out, M, N, Kred, R, *a.stride(), *b.stride(),
            *left.stride(), *right.stride(), *c.stride(), *out.stride(), seed, dropout_p, lora_scale * keep_scale,
            _rows_class(M))
    constexprs = dict(HAS_BIAS=bias is not None, HAS_C=accumulate is not None, MASKED=flags["HAS_DROPOUT"],
                      IEEE=a.dtype == torch.float32, BLOCK_R=_rank_block(R), GROUP_M=GEMM_GROUP_M)
    if a.device.type == "cuda":
        _lora_gemm_tuned[grid](*args, **constexprs)
    else:
        _lora_gemm_kernel[grid(INTERPRETED_GEMM_BLOCKS)](*args, **constexprs, **INTERPRETED_GEMM_BLOCKS)
    return out


def materialize_keep_mask(seed: int, rows: int, cols: int, dropout_p: float, device) -> torch.Tensor:
    """The mask exactly as the kernels draw it (bool [rows, cols]); for tests and inspection."""
    _require_triton()
    out = torch.empty(rows, cols, device=device, dtype=torch.int8)
    grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 64))
    _keep_mask_kernel[grid](out, rows, cols, seed, dropout_p, BLOCK_M=32, BLOCK_K=64)
    return out.bool()



# ----------------------------------------------------------------------------- reference
# rng="torch": 16-bit uniforms, four from each 64-bit draw of torch's generator (its cost is per
# draw; bernoulli_ spends one draw per element). p is rounded to a multiple of 2**-16 and the
# kept values are scaled by the rounded rate, so the mask stays exactly unbiased. Measured on CPU
# (1900 x 128 mask, one thread): 0.35 ms against 1.34 ms for bernoulli_; a tiny-preset training
# step 7% faster.
TORCH_MASK_BITS = 16


def effective_dropout(dropout_p: float, rng: str) -> float:
    """The drop rate the reference's mask really has (rng="torch" rounds it to 2**-16)."""
    if rng == "torch":
        return round(dropout_p * 2**TORCH_MASK_BITS) / 2**TORCH_MASK_BITS
    return dropout_p


def reference_keep_mask(seed: int, rows: int, cols: int, dropout_p: float, device, rng="philox") -> torch.Tensor:
    """The reference's keep mask: the kernels' Philox mask (rng="philox"), or 16-bit uniforms
    from torch's RNG seeded with `seed` (rng="torch", drop rate ``effective_dropout``)."""
    if rng == "torch":
        generator = torch.Generator(device=device).manual_seed(seed)
        n = rows * cols
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None, generator=generator)
        uniform16 = words.view(torch.int16)[:n].view(rows, cols)   # uniform over [-2**15, 2**15)
        return uniform16 >= round(dropout_p * 2**TORCH_MASK_BITS) - 2**(TORCH_MASK_BITS - 1)
    return dropout_keep_mask(seed, rows, cols, dropout_p, device)


def _reference_dropout(x2d, dropout_p, seed, keep_mask=None, rng="philox"):
    """x with the dropped elements zeroed, NOT yet scaled by 1 / (1 - p): ``lora_rows`` applies
    that gain to the [M, r] intermediate instead of to every element of x."""
    if dropout_p == 0.0:
        return x2d
    if keep_mask is None:
        keep_mask = reference_keep_mask(seed, x2d.shape[0], x2d.shape[1], dropout_p, x2d.device, rng)
    return x2d * (keep_mask if keep_mask.dtype == torch.bool else keep_mask.to(x2d.dtype))


def dropout_gain(dropout_p: float, rng: str) -> float:
    """1 / (1 - p) of the mask the reference draws (inverted dropout)."""
    return 1.0 / (1.0 - effective_dropout(dropout_p, rng))


def lora_rows(x2d, dropped, weight, lora_A, lora_B, scale, bias=None):
    """y = x W^T + b + scale (dropped A^T) B^T over rows, in the order that costs the fewest passes
    over [M, K] and [M, N] in plain PyTorch: the scale (times the dropout gain, folded in by the
    caller) multiplies the [M, r] intermediate, and the rank-r product accumulates into the base
    GEMM's output (addmm_, beta=1) instead of being written and added. In place is safe: a linear
    saves its inputs for backward, not its output."""
    return F.linear(x2d, weight, bias).addmm_(F.linear(dropped, lora_A) * scale, lora_B.t())


def lora_linear_reference(x, weight, lora_A, lora_B, scale, bias=None, dropout_p=0.0, seed=None, keep_mask=None,
                          rng="philox"):
    """Plain-PyTorch LoRA linear; autograd gives the gradients. `keep_mask` overrides the seed's
    mask; rng="torch" draws the mask with torch's RNG instead of the kernels' Philox."""
    seed = _check_seed(dropout_p, seed)
    x2d = x.reshape(-1, x.shape[-1])
    dropped = _reference_dropout(x2d, dropout_p, seed, keep_mask, rng)
    y = lora_rows(x2d, dropped, weight, lora_A, lora_B, scale * dropout_gain(dropout_p, rng), bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------- fused path
def _group_forward(x2d, lora_A_cat, weights, lora_Bs, biases, scale, dropout_p, seed, fused_gemm):
    """Projections of one input: the down projection for all of them in one pass over x."""
    rank = lora_A_cat.shape[0] // len(weights)
    xa_cat = lora_down(x2d, lora_A_cat, dropout_p, seed)
    outs = []
    for g, (weight, lora_B, bias) in enumerate(zip(weights, lora_Bs, biases)):
        xa = xa_cat[:, g * rank:(g + 1) * rank]
        if fused_gemm:
            outs.append(lora_gemm(x2d, weight.t(), xa, lora_B.t(), scale, bias))
            continue
        if bias is None:
            y = torch.addmm(xa.new_zeros(()).expand(weight.shape[0]), xa, lora_B.t(), beta=0, alpha=scale)
        else:
            y = torch.addmm(bias.to(x2d.dtype), xa, lora_B.t(), alpha=scale)
        outs.append(y.addmm_(x2d, weight.t()))  # the base GEMM accumulates into the LoRA term
    return outs, xa_cat


def _grad_input(grads, weights, gB_cat, lora_A_cat, scale, dropout_p, seed, fused_gemm):
    """dx = sum_g dy_g W_g + m / (1 - p) * s * (dy B)_cat A_cat, without an [M, K] temporary."""
    dx = torch.mm(grads[0], weights[0]) if not fused_gemm or len(grads) > 1 else None
    for dy, weight in zip(grads[1:-1] if fused_gemm else grads[1:], weights[1:-1] if fused_gemm else weights[1:]):
        dx.addmm_(dy, weight)
    if fused_gemm:
        return lora_gemm(grads[-1], weights[-1], gB_cat, lora_A_cat, scale, None, dx, dropout_p, seed)
    return lora_add_dx(dx, gB_cat, lora_A_cat, scale, dropout_p, seed)


def _group_backward(grads, x2d, xa_cat, lora_A_cat, weights, lora_Bs, hyper, need_x, need_A, need_B):
    scale, dropout_p, seed, fused_gemm = hyper
    rank = lora_A_cat.shape[0] // len(weights)
    grads = [dy.reshape(-1, dy.shape[-1]) for dy in grads]
    dBs = [None] * len(weights)
    if need_B:
        dBs = [torch.mm(dy.t(), xa_cat[:, g * rank:(g + 1) * rank]).mul_(scale) for g, dy in enumerate(grads)]
    gB_cat = torch.cat([torch.mm(dy, lora_B) for dy, lora_B in zip(grads, lora_Bs)], dim=1)
    dx = dA_cat = None
    if need_x:
        dx = _grad_input(grads, weights, gB_cat, lora_A_cat, scale, dropout_p, seed, fused_gemm)
    if need_A:
        dA_cat = lora_grad_A(gB_cat, x2d, scale, dropout_p, seed).to(lora_A_cat.dtype)
    return dx, dA_cat, dBs


class LoRAGroupFunction(torch.autograd.Function):
    """G LoRA projections of one input x2d; A's concatenated along the rank [G*r, K].

    hyper = (scale, dropout_p, seed, fused_gemm); params = G weights, G lora_B's, G biases (or None).
    """

    @staticmethod
    def forward(ctx, x2d, lora_A_cat, hyper, *params):
        G = len(params) // 3
        weights, lora_Bs, biases = params[:G], params[G:2 * G], params[2 * G:]
        outs, xa_cat = _group_forward(x2d, lora_A_cat, weights, lora_Bs, biases, *hyper)
        ctx.save_for_backward(x2d, xa_cat, lora_A_cat, *weights, *lora_Bs)
        ctx.hyper = hyper
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        G = len(grads)
        x2d, xa_cat, lora_A_cat, *rest = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dA_cat, dBs = _group_backward(grads, x2d, xa_cat, lora_A_cat, rest[:G], rest[G:], ctx.hyper,
                                          need[0], need[1], any(need[3 + G:3 + 2 * G]))
        return (dx, dA_cat, None, *([None] * G), *dBs, *([None] * G))


def _autocast_input(x):
    """Under torch.autocast the fused path computes in the autocast dtype, as F.linear would."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return x.to(torch.get_autocast_dtype("cuda"))
    return x


def _as_input_dtype(x, tensors):
    """Adapters may be kept in fp32 for the optimizer: compute in x's dtype (autograd casts back)."""
    return [t if t is None or t.dtype == x.dtype else t.to(x.dtype) for t in tensors]


def _check_shapes(name, x, weight, lora_A, lora_B):
    K = x.shape[-1]
    if weight.shape[1] != K or lora_A.shape[1] != K or lora_B.shape[0] != weight.shape[0] \
            or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(
            f"{name}: shapes do not fit x [..., {K}], weight [N, K] {tuple(weight.shape)}, "
            f"lora_A [r, K] {tuple(lora_A.shape)}, lora_B [N, r] {tuple(lora_B.shape)}; "
            "adapters use PEFT's orientation (lora_A.weight, lora_B.weight)."
        )


def lora_linear(x, weight, lora_A, lora_B, scale, bias=None, dropout_p=0.0, seed=None, impl="auto"):
    """y = x W^T + b + scale * dropout(x) A^T B^T, differentiable in x, lora_A and lora_B."""
    impl = resolve_lora_impl(impl, x.device)
    _check_shapes("lora_linear", x, weight, lora_A, lora_B)
    seed = _check_seed(dropout_p, seed)
    if impl in ("reference", "torch"):
        return lora_linear_reference(x, weight, lora_A, lora_B, scale, bias, dropout_p, seed,
                                     rng="philox" if impl == "reference" else "torch")
    x = _autocast_input(x)
    weight, lora_A, lora_B, bias = _as_input_dtype(x, [weight, lora_A, lora_B, bias])
    hyper = (float(scale), float(dropout_p), seed, impl == "triton_gemm")
    (y,) = LoRAGroupFunction.apply(x.reshape(-1, x.shape[-1]), lora_A, hyper, weight, lora_B, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


__all__ = [
    "lora_linear", "resolve_lora_impl", "dropout_keep_mask", "materialize_keep_mask", "lora_linear_reference",
    "reference_keep_mask", "LoRAGroupFunction",
]
