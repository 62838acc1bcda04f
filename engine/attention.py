"""Attention backends for packed (padding-free) batches, and Liger-Kernel's fused ops on the LLM.

Backends (`model.attn_backend`):
  flash_attn    flash-attn's varlen kernels (transformers' "flash_attention_2"); CUDA, package installed
  torch_varlen  PyTorch's `torch.nn.attention.varlen.varlen_attn` (a FlashAttention varlen kernel
                shipped with torch); CUDA only: on CPU torch has no kernel behind it
  sdpa_varlen   causal `scaled_dot_product_attention` within each sample of a packed row (or row
                of a padded batch, unpadded), samples of similar length batched into one call
                (`bucketed_varlen_attn`): the varlen path on any device, for CPU packing
  sdpa          `scaled_dot_product_attention`; a packed row gets a block-diagonal causal mask
                built by transformers from the position ids (CPU, tests)
  eager         transformers' plain matmul-softmax attention (debugging; never chosen by auto)
  auto          the first available of flash_attn, torch_varlen, sdpa; with data.packing where
                neither flash kernel exists (CPU), sdpa_varlen

Why sdpa_varlen for packed rows on CPU: under sdpa a packed row of T tokens attends through a
[T, T] block-diagonal mask, so every layer computes all T^2 scores (an explicit mask also turns
off the causal block skipping of the CPU flash kernel); one causal call per sample computes
sum(L_i^2) / 2 (bucketing similar lengths adds at most BUCKET_SLACK to that and saves the
per-sample loop: a packed step went from 0.96x to 0.99x of the padded step's tokens/s, in-process
A/B, one thread). Measured on the tiny preset (CPU, fp32, one thread, demo data packed into rows
of ~2000 tokens holding ~14 samples): a training step took 2.7x less CPU time than under sdpa,
with the same losses (tests/engine/test_attention.py checks packed == alone for both).

How a packed row stays per-sample:
- LLM: the model is called with `attention_mask=None` and 4-row position ids (row 0 restarts at
  each sample). transformers reads row 0 to build the block-diagonal causal mask (sdpa) and our
  varlen functions read the sample boundaries from `cu_seq_lens_*` kwargs (passed by
  `packed_hidden_states`, so no layer has to find them from the positions with a device sync).
- Audio encoder: it already attends within windows of one clip (its own `cu_seqlens`). Under an
  implementation whose name contains "flash" it hands all windows to one varlen call, otherwise
  it loops over windows. Our torch varlen function is registered as `TORCH_VARLEN_IMPL`, a name
  with "flash" in it for that reason (the kernel behind it is a FlashAttention kernel).
"""
from __future__ import annotations

import importlib.util
import logging
import types

import torch
from torch import nn

log = logging.getLogger("omnitrain")

BACKENDS = ("flash_attn", "torch_varlen", "sdpa_varlen", "sdpa", "eager")
AUTO_ORDER = ("flash_attn", "torch_varlen", "sdpa")  # fastest first
# Packed rows without a flash kernel: per-sample SDPA beats one block-diagonal-masked SDPA.
AUTO_PACKED_FALLBACK = "sdpa_varlen"
# transformers' attention implementation names. The torch varlen one is ours, registered with
# transformers' AttentionInterface on first use; "flash" in it routes the audio encoder's
# windows into one varlen call (transformers' is_flash_attention_requested checks the name).
TORCH_VARLEN_IMPL = "torch_flash_varlen"
# The per-sample SDPA loop behind the same varlen interface ("flash" in the name for the same reason).
SDPA_VARLEN_IMPL = "sdpa_flash_varlen"
IMPLEMENTATIONS = {"flash_attn": "flash_attention_2", "torch_varlen": TORCH_VARLEN_IMPL, "sdpa_varlen": SDPA_VARLEN_IMPL,
                   "sdpa": "sdpa", "eager": "eager"}


# --- backend selection ------------------------------------------------------------------------
def torch_varlen_kernel():
    """PyTorch's varlen attention function, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available_backends(device: torch.device) -> list[str]:
    device = torch.device(device)
    found = []
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attn")
    if device.type == "cuda" and torch_varlen_kernel() is not None:
        found.append("torch_varlen")
    found += ["sdpa_varlen", "sdpa", "eager"]
    return found


def resolve_attn_backend(name: str, device, packing: bool = False) -> str:
    """`model.attn_backend` -> the backend to run: one of BACKENDS (`packing`: data.packing)."""
    available = available_backends(device)
    if name == "auto":
        best = next(b for b in AUTO_ORDER if b in available)
        return AUTO_PACKED_FALLBACK if packing and best == "sdpa" else best
    if name not in BACKENDS:
        raise ValueError(f"model.attn_backend={name!r} is not a backend; use auto, {', '.join(BACKENDS)}")
    if name not in available:
        why = {"flash_attn": "needs CUDA and the flash-attn package (pip install flash-attn)",
               "torch_varlen": "needs CUDA and a torch with torch.nn.attention.varlen.varlen_attn"}[name]
        raise ValueError(f"model.attn_backend={name} is not available on {torch.device(device)}: it {why}. "
                         f"Available here: {', '.join(available)} (or auto)")
    return name


def set_attn_backend(thinker: nn.Module, backend: str) -> str:
    """Point the thinker's LLM and audio encoder at `backend`; returns transformers' name for it."""
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"attention backend {backend!r} unknown; resolve it with resolve_attn_backend first")
    impl = IMPLEMENTATIONS[backend]
    if backend == "torch_varlen":
        register_varlen_attention(TORCH_VARLEN_IMPL, torch_varlen_kernel())
    elif backend == "sdpa_varlen":
        register_varlen_attention(SDPA_VARLEN_IMPL, bucketed_varlen_attn)
    set_attn_implementation(thinker, impl)
    log.info("attention backend: %s (transformers implementation %s)", backend, impl)
    return impl


def set_attn_implementation(thinker: nn.Module, impl: str) -> None:
    # The attention modules read config._attn_implementation at each call and share these config
    # objects, so setting it on the configs switches every layer.
    for config in (thinker.config, thinker.config.text_config, thinker.config.audio_config):
        config._attn_implementation = impl


# --- varlen attention as a transformers attention function -------------------------------------
def register_varlen_attention(name: str, kernel) -> None:
    """Register `kernel` (varlen_attn's signature) with transformers under `name`.

    Its mask function is flash-attn's: None for a packed row (the boundaries travel as
    cu_seq_lens kwargs) and the 2-D padding mask for a padded batch, which is then unpadded.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    if "flash" not in name:
        raise ValueError(f"varlen implementation name {name!r} must contain 'flash' (see module docstring)")
    AttentionInterface.register(name, make_varlen_attention(kernel))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, flash_attention_mask)


# FlashAttention kernels (flash-attn's and torch's varlen_attn) take 16-bit inputs only.
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def make_varlen_attention(kernel):
    needs_16_bit = kernel is torch_varlen_kernel()

    def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, is_causal: bool | None = None,
                                 cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                                 position_ids=None, **kwargs):
        if dropout:
            raise ValueError(f"varlen attention has no attention dropout (got {dropout}); set it to 0 in the config")
        if needs_16_bit and query.dtype not in FLASH_DTYPES:
            raise ValueError(f"model.attn_backend=torch_varlen runs FlashAttention, which takes bf16/fp16, not "
                             f"{query.dtype}: set model.dtype=bf16 (or auto), or model.attn_backend=sdpa")
        causal = module.is_causal if is_causal is None else is_causal
        batch, heads, length, head_dim = query.shape
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, T, H, D]
        keep = None
        if attention_mask is not None:  # padded batch: unpad the real tokens
            keep = attention_mask.bool().reshape(-1)
            cu = nn.functional.pad(attention_mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
            longest = int(attention_mask.sum(1).max())
        elif cu_seq_lens_q is not None:
            cu, longest = cu_seq_lens_q.to(torch.int32), int(max_length_q)
        else:
            cu, longest = boundaries_from_positions(position_ids, batch, length, query.device)
        flat = [t.reshape(batch * length, t.shape[2], head_dim) for t in (q, k, v)]
        if keep is not None:
            flat = [t[keep] for t in flat]
        out = kernel(*flat, cu, cu, longest, longest, scale=scaling, window_size=(-1, 0) if causal else (-1, -1),
                     enable_gqa=key.shape[1] != heads)
        if keep is not None:
            full = out.new_zeros(batch * length, heads, head_dim)
            out = full.index_put((keep.nonzero().squeeze(1),), out)
        return out.reshape(batch, length, heads, head_dim), None

    return varlen_attention_forward


def boundaries_from_positions(position_ids, batch: int, length: int, device) -> tuple[torch.Tensor, int]:
    """cu_seqlens and longest sample from positions that restart at 0 per sample (or whole rows)."""
    if position_ids is None:
        return torch.arange(batch + 1, device=device, dtype=torch.int32) * length, length
    starts = (position_ids.reshape(-1) == 0).nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([position_ids.numel()])])
    cu = nn.functional.pad(ends, (1, 0)).to(torch.int32)
    return cu, int((ends - starts).max())


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                          window_size=(-1, -1), enable_gqa=False):
    """Plain PyTorch varlen attention (one SDPA per sample), varlen_attn's signature: the ground
    truth for the varlen path on machines without its CUDA kernel, and the sdpa_varlen backend."""
    causal = tuple(window_size) == (-1, 0)
    outs = []
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        q, k, v = (t[a:b].transpose(0, 1)[None] for t in (query, key, value))
        outs.append(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                               enable_gqa=enable_gqa)[0].transpose(0, 1))
    return torch.cat(outs)


# A bucket of samples attended as one padded SDPA call may cost at most this much more attention
# work (n * L_max^2 against the sum of L_i^2) than one call per sample: the padded call saves the
# Python loop, the per-sample slicing and the gradient accumulation of the slices (~8% of a
# tiny-preset packed CPU step), which a 25% larger attention (~15% of the step) outweighs.
BUCKET_SLACK = 1.25


def length_buckets(lengths: list[int], slack: float = BUCKET_SLACK) -> list[list[int]]:
    """Sample indices grouped, longest first, so that padding each group to its longest sample
    costs at most `slack` times the group's own sum of squared lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets, start = [], 0
    while start < len(order):
        longest, squares, end = lengths[order[start]], lengths[order[start]] ** 2, start + 1
        while end < len(order) and (end - start + 1) * longest ** 2 <= slack * (squares + lengths[order[end]] ** 2):
            squares += lengths[order[end]] ** 2
            end += 1
        buckets.append(order[start:end])
        start = end
    return buckets


def bucketed_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                         window_size=(-1, -1), enable_gqa=False):
    """varlen attention (varlen_attn's signature, [T, H, D] inputs) as one SDPA per bucket of
    samples of similar length (``length_buckets``) laid out as a padded batch. Causal: no mask
    is needed, a real query never reaches the padding after its sample (and the CPU kernel
    skips the blocks above the diagonal); otherwise a key-padding mask. Equal to
    ``reference_varlen_attn`` (tests/engine/test_attention.py)."""
    if not torch.equal(cu_seq_q, cu_seq_k):
        return reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                     window_size=window_size, enable_gqa=enable_gqa)
    causal = tuple(window_size) == (-1, 0)
    bounds = cu_seq_q.tolist()
    starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    outs, order = [], []
    for bucket in length_buckets(lengths):
        longest = lengths[bucket[0]]
        positions = torch.arange(longest, device=query.device)
        first = torch.tensor([starts[i] for i in bucket], device=query.device)
        valid = positions[None, :] < torch.tensor([lengths[i] for i in bucket], device=query.device)[:, None]
        index = torch.where(valid, first[:, None] + positions[None, :], first[:, None])   # pads read a real token
        q, k, v = (t[index].transpose(1, 2) for t in (query, key, value))           # [n, H, L, D]
        mask = None if causal else valid[:, None, None, :]
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                         enable_gqa=enable_gqa)
        outs.append(out.transpose(1, 2)[valid])
        order.append(index[valid])
    inverse = torch.empty(query.shape[0], dtype=torch.long, device=query.device)
    order = torch.cat(order)
    inverse[order] = torch.arange(order.numel(), device=query.device)
    return torch.cat(outs)[inverse]


# --- the LLM's mask on a padded batch ----------------------------------------------------------
# Implementations whose kernel skips the blocks above the diagonal only when given no mask.
CAUSAL_SKIP_IMPLEMENTATIONS = ("sdpa",)


def llm_attention_mask(attention_mask: torch.Tensor | None, attn_implementation: str) -> torch.Tensor | None:
    """The padding mask to hand the LLM, or None where causal attention alone gives the same result.

    In a right-padded batch (each row: its real tokens, then padding) a real token's causal window
    never reaches a pad, so the padding mask changes only the outputs at pad positions, which no
    label, loss or prediction reads (and no real token attends to). Without a mask transformers'
    sdpa path runs `is_causal`, and torch's CPU flash kernel skips the blocks above the diagonal
    instead of computing all T^2 scores under a materialized [B, 1, T, T] mask (tiny preset, CPU,
    fp32, demo batches, one thread: 1-4% of a training step in two interleaved A/B runs, equal
    losses). Left-padded or gappy masks are kept as given.
    Costs one host read of a [B, T - 1] comparison (free on CPU).
    """
    if attention_mask is None or attn_implementation not in CAUSAL_SKIP_IMPLEMENTATIONS:
        return attention_mask
    right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    return None if right_padded else attention_mask


# --- the model on a packed batch ---------------------------------------------------------------
def packed_hidden_states(model, batch: dict) -> torch.Tensor:
    """OmniLoRAModel's LLM hidden states [1, T, H] of a packed batch (loaders/packing.py format).

    Audio: every clip is encoded on its own windows (the encoder never mixes clips). LLM: no 2-D
    attention mask, 4-row position ids, and the sample boundaries for the varlen backends.
    """
    audio = model.encode_audio(batch.get("input_features"), batch.get("feature_attention_mask"))
    embeds = model.embed(batch["input_ids"], audio)
    extra = {}
    if "flash" in model.llm.config._attn_implementation:  # flash-attn, torch varlen (and its reference)
        cu = batch["cu_seqlens"].to(embeds.device, torch.int32)
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(batch["max_seqlen"]),
                     max_length_k=int(batch["max_seqlen"]))
    out = model.llm(inputs_embeds=embeds, attention_mask=None, position_ids=batch["position_ids"].to(embeds.device),
                    use_cache=False, **extra)
    return out.last_hidden_state


# --- Liger-Kernel on the LLM -------------------------------------------------------------------
def resolve_liger(setting, device) -> bool:
    """`model.liger` (auto | true | false) -> whether to apply Liger's ops: auto = on CUDA."""
    device = torch.device(device)
    if setting == "auto":
        return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if setting is True or setting == "true":
        if device.type != "cuda":
            raise ValueError(f"model.liger=true needs CUDA (Liger's Triton kernels); the model is on {device}: "
                             "use model.liger=auto or false")
        if importlib.util.find_spec("liger_kernel") is None:
            raise ValueError("model.liger=true but liger-kernel is not installed: pip install liger-kernel, "
                             "or set model.liger=false")
        return True
    if setting is False or setting == "false":
        return False
    raise ValueError(f"model.liger={setting!r}; use auto, true or false")


class LigerSwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with Liger's fused silu-multiply, calling the layer's own
    projections (our LoRALinear when LoRA-wrapped), so adapters keep training through it."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops import LigerSiLUMulFunction

        return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x), 1.0, 1.0))


def rotary_axes_forward(self, x, position_ids):
    """Qwen2.5-Omni's rotary embedding without its M-RoPE recomposition: cos/sin per axis
    [3, B, T, head_dim], which Liger's M-RoPE kernel recomposes and applies in one pass."""
    position_ids = position_ids.expand(3, -1, -1)
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
    return cos.to(x.dtype), sin.to(x.dtype)


def liger_attention_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                            position_embeddings=None, **kwargs):
    """Qwen2_5OmniAttention.forward (transformers 5.x) with Liger's M-RoPE; training path (no cache)."""
    from liger_kernel.transformers.qwen2vl_mrope import liger_multimodal_rotary_pos_emb
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if cache is not None:
        raise ValueError("Liger's attention patch is for training (no KV cache); decode with model.liger=false")
    bsz, q_len, _ = hidden_states.size()
    shape = (bsz, q_len, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = liger_multimodal_rotary_pos_emb(query, key, cos, sin, self.mrope_section)
    attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, weights = attention(self, query, key, value, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, sliding_window=self.sliding_window, position_ids=position_ids, **kwargs)
    return self.o_proj(out.reshape(bsz, q_len, -1).contiguous()), weights


def apply_liger(llm: nn.Module) -> list[str]:
    """Swap Liger's RMSNorm, SwiGLU and M-RoPE into the thinker's LLM (the text model), in place.

    Parameters are shared, not copied (names and FSDP sharding unchanged). Returns what was
    patched. Apply before FSDP wrapping and after LoRA (the SwiGLU keeps the LoRA projections).
    """
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    if llm.config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"Liger's SwiGLU needs a silu MLP; this LLM uses {llm.config.hidden_act}: set model.liger=false")
    mrope_section = list(llm.rotary_emb.mrope_section)

    def liger_norm(norm: nn.Module) -> nn.Module:
        new = LigerRMSNorm(norm.weight.shape[0], eps=norm.variance_epsilon)
        new.weight = norm.weight
        return new

    for layer in llm.layers:
        layer.input_layernorm = liger_norm(layer.input_layernorm)
        layer.post_attention_layernorm = liger_norm(layer.post_attention_layernorm)
        layer.mlp = LigerSwiGLU(layer.mlp)
        layer.self_attn.mrope_section = mrope_section
        layer.self_attn.forward = types.MethodType(liger_attention_forward, layer.self_attn)
    llm.norm = liger_norm(llm.norm)
    llm.rotary_emb.forward = types.MethodType(rotary_axes_forward, llm.rotary_emb)
    patched = ["rms_norm", "swiglu", "mrope"]
    log.info("liger kernels on the LLM: %s (%d layers)", ", ".join(patched), len(llm.layers))
    return patched
