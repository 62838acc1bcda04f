"""Grouped LoRA: projections that read one input run with their adapters side by side.

    lora_qkv(x, ...)  -> (q, k, v): three LoRA linears of x (attention), x read once
    lora_mlp(x, ...)  -> down(silu(gate(x)) * up(x)) with LoRA on all three (Qwen2's MLP): gate and
                         up read x once, SwiGLU is fused and recomputed in backward instead of stored

Both run on kernels/lora.py's LoRAGroupFunction machinery (the adapters' A matrices concatenated
along the rank, one down-projection pass over x). Dropout masks, as defined here and drawn alike
by every implementation: projections that read the same input share one mask, from the group's
seed (q, k and v; gate and up), exactly as separate `lora_linear` calls given that seed; the down
projection reads h = silu(gate) * up and takes a mask from a seed derived from the group's
(`_down_seed`). impl: as `lora_linear` (auto | triton | triton_gemm | reference | torch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.lora import (SEED_MODULUS, LoRAGroupFunction, _as_input_dtype, _autocast_input, _check_seed,
                          _check_shapes, _group_backward, _group_forward, _reference_dropout, _require_triton,
                          dropout_gain, lora_linear_reference, lora_rows, resolve_lora_impl)

try:  # triton is a Linux-only dependency; the reference path runs without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None

# The down projection of lora_mlp reads h = silu(gate) * up, not x: its mask comes from a
# second seed derived from the first (a fixed bijection, so distinct seeds stay distinct).
DOWN_SEED_XOR = 0x5BD1E995
# Elements per program of the elementwise SwiGLU kernels (memory-bound; one block size fits all).
SWIGLU_BLOCK = 1024


def _down_seed(seed: int) -> int:
    return (seed ^ DOWN_SEED_XOR) % SEED_MODULUS


# ----------------------------------------------------------------------------- SwiGLU kernels
if triton is not None:
    @triton.jit
    def _swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(h_ptr + offs, (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty), mask=offs < n)

    @triton.jit
    def _swiglu_backward_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        dh = tl.load(dh_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        tl.store(dg_ptr + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=offs < n)
        tl.store(du_ptr + offs, (dh * g * sig).to(du_ptr.dtype.element_ty), mask=offs < n)


def swiglu_forward(gate, up):
    _require_triton()
    gate, up = gate.contiguous(), up.contiguous()
    h = torch.empty_like(gate)
    _swiglu_forward_kernel[(triton.cdiv(gate.numel(), SWIGLU_BLOCK),)](gate, up, h, gate.numel(), BLOCK=SWIGLU_BLOCK)
    return h


def swiglu_backward(dh, gate, up):
    """(d gate, d up) of h = silu(gate) * up, recomputing silu from the stored gate."""
    _require_triton()
    dh = dh.contiguous()
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    _swiglu_backward_kernel[(triton.cdiv(dh.numel(), SWIGLU_BLOCK),)](dh, gate, up, d_gate, d_up, dh.numel(),
                                                                      BLOCK=SWIGLU_BLOCK)
    return d_gate, d_up


# ----------------------------------------------------------------------------- reference
def _dropped_once(x, dropout_p, seed, rng):
    """x as rows, and its dropout with the group's one mask: drawn and applied once, not per
    projection; with the mask's gain 1 / (1 - p), which lora_rows folds into the scale."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d, _reference_dropout(x2d, dropout_p, seed, None, rng), dropout_gain(dropout_p, rng)


def _lora_of_dropped(x2d, dropped, weight, lora_A, lora_B, scale, bias, lead_shape):
    return lora_rows(x2d, dropped, weight, lora_A, lora_B, scale, bias).reshape(*lead_shape, weight.shape[0])


def lora_qkv_reference(x, weights, lora_As, lora_Bs, scale, biases=(None, None, None), dropout_p=0.0, seed=None,
                       rng="philox"):
    """Three plain-PyTorch LoRA linears of x with the group's one mask."""
    seed = _check_seed(dropout_p, seed)
    x2d, dropped, gain = _dropped_once(x, dropout_p, seed, rng)
    return tuple(_lora_of_dropped(x2d, dropped, w, a, b, scale * gain, bias, x.shape[:-1])
                 for w, a, b, bias in zip(weights, lora_As, lora_Bs, biases))


def lora_mlp_reference(x, weights, lora_As, lora_Bs, scale, dropout_p=0.0, seed=None, rng="philox"):
    """down(silu(gate(x)) * up(x)), each a LoRA linear without bias (as in Qwen2 MLPs)."""
    seed = _check_seed(dropout_p, seed)
    (wg, wu, wd), (ag, au, ad), (bg, bu, bd) = weights, lora_As, lora_Bs
    x2d, dropped, gain = _dropped_once(x, dropout_p, seed, rng)
    gate = _lora_of_dropped(x2d, dropped, wg, ag, bg, scale * gain, None, x.shape[:-1])
    up = _lora_of_dropped(x2d, dropped, wu, au, bu, scale * gain, None, x.shape[:-1])
    return lora_linear_reference(F.silu(gate) * up, wd, ad, bd, scale, None, dropout_p, _down_seed(seed), rng=rng)


# ----------------------------------------------------------------------------- fused path
def lora_qkv(x, weights, lora_As, lora_Bs, scale, biases=(None, None, None), dropout_p=0.0, seed=None, impl="auto"):
    """(q, k, v) = three LoRA linears of x; the triton path reads x once for all three adapters."""
    impl = resolve_lora_impl(impl, x.device)
    for w, a, b in zip(weights, lora_As, lora_Bs):
        _check_shapes("lora_qkv", x, w, a, b)
    if len({a.shape[0] for a in lora_As}) != 1:
        raise ValueError(f"lora_qkv: q, k and v adapters need one rank, got {[a.shape[0] for a in lora_As]}.")
    seed = _check_seed(dropout_p, seed)
    if impl in ("reference", "torch"):
        return lora_qkv_reference(x, weights, lora_As, lora_Bs, scale, biases, dropout_p, seed,
                                  rng="philox" if impl == "reference" else "torch")
    x = _autocast_input(x)
    weights, lora_As, lora_Bs, biases = (_as_input_dtype(x, list(t)) for t in (weights, lora_As, lora_Bs, biases))
    hyper = (float(scale), float(dropout_p), seed, impl == "triton_gemm")
    outs = LoRAGroupFunction.apply(x.reshape(-1, x.shape[-1]), torch.cat(lora_As), hyper, *weights, *lora_Bs, *biases)
    return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in outs)


class LoRAMLPFunction(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with LoRA on all three; h = silu(gate) * up is not stored."""

    @staticmethod
    def forward(ctx, x2d, lora_A_gu, lora_A_down, hyper, w_gate, w_up, w_down, B_gate, B_up, B_down):
        scale, dropout_p, seed, fused_gemm = hyper
        (gate, up), xa_gu = _group_forward(x2d, lora_A_gu, (w_gate, w_up), (B_gate, B_up), (None, None), *hyper)
        h = swiglu_forward(gate, up)
        (out,), xa_down = _group_forward(h, lora_A_down, (w_down,), (B_down,), (None,), scale, dropout_p,
                                         _down_seed(seed), fused_gemm)
        del h
        ctx.save_for_backward(x2d, xa_gu, gate, up, xa_down, lora_A_gu, lora_A_down, w_gate, w_up, w_down,
                              B_gate, B_up, B_down)
        ctx.hyper = hyper
        return out

    @staticmethod
    def backward(ctx, d_out):
        scale, dropout_p, seed, fused_gemm = ctx.hyper
        x2d, xa_gu, gate, up, xa_down, lora_A_gu, lora_A_down, w_gate, w_up, w_down, B_gate, B_up, B_down = \
            ctx.saved_tensors
        need = ctx.needs_input_grad
        need_A, need_B = need[1] or need[2], any(need[7:10])
        h = swiglu_forward(gate, up)  # recomputed: dA_down needs the down projection's input
        down_hyper = (scale, dropout_p, _down_seed(seed), fused_gemm)
        dh, dA_down, (dB_down,) = _group_backward((d_out,), h, xa_down, lora_A_down, (w_down,), (B_down,),
                                                  down_hyper, True, need_A, need_B)
        del h
        d_gate, d_up = swiglu_backward(dh, gate, up)
        del dh
        dx, dA_gu, (dB_gate, dB_up) = _group_backward((d_gate, d_up), x2d, xa_gu, lora_A_gu, (w_gate, w_up),
                                                      (B_gate, B_up), ctx.hyper, need[0], need_A, need_B)
        return dx, dA_gu, dA_down, None, None, None, None, dB_gate, dB_up, dB_down


def lora_mlp(x, weights, lora_As, lora_Bs, scale, dropout_p=0.0, seed=None, impl="auto"):
    """down(silu(gate(x)) * up(x)); weights/lora_As/lora_Bs ordered (gate, up, down), no biases."""
    impl = resolve_lora_impl(impl, x.device)
    _check_shapes("lora_mlp gate", x, weights[0], lora_As[0], lora_Bs[0])
    _check_shapes("lora_mlp up", x, weights[1], lora_As[1], lora_Bs[1])
    _check_shapes("lora_mlp down", x.new_empty(0, weights[0].shape[0]), weights[2], lora_As[2], lora_Bs[2])
    seed = _check_seed(dropout_p, seed)
    if impl in ("reference", "torch"):
        return lora_mlp_reference(x, weights, lora_As, lora_Bs, scale, dropout_p, seed,
                                  rng="philox" if impl == "reference" else "torch")
    x = _autocast_input(x)
    weights, lora_As, lora_Bs = (_as_input_dtype(x, list(t)) for t in (weights, lora_As, lora_Bs))
    hyper = (float(scale), float(dropout_p), seed, impl == "triton_gemm")
    out = LoRAMLPFunction.apply(x.reshape(-1, x.shape[-1]), torch.cat(lora_As[:2]), lora_As[2], hyper,
                                *weights, *lora_Bs)
    return out.reshape(*x.shape[:-1], out.shape[-1])


__all__ = ["lora_qkv", "lora_mlp", "lora_qkv_reference", "lora_mlp_reference", "swiglu_forward", "swiglu_backward"]
