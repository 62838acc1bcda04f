"""Fused linear + cross-entropy: the loss of a large-vocabulary head without [T, V] logits.

For hidden states h [T, H], an output matrix W [V, H] and labels y [T], the per-token loss is

    z = h @ W.T                        (one row of logits, V wide)
    lse = logsumexp(z)
    loss = lse - (1 - eps) * z[y] - eps * mean(z) + z_loss * lse^2        (0 where y is ignored)

with eps the label smoothing (the same formula as torch's F.cross_entropy(label_smoothing=eps))
and z_loss the log-partition penalty. Its gradient with respect to the logits is

    dz = softmax(z) * (1 + 2 * z_loss * lse) - eps / V - (1 - eps) * onehot(y)

so dh = dz @ W and dW = dz.T @ h. Tokens are processed in chunks: each chunk's logits are
computed by one GEMM, turned in place into dz by a row kernel (online log-sum-exp over vocab
blocks, then one gradient pass), and immediately consumed by the dh and dW GEMMs. Only one
chunk of logits ever exists, and backward merely scales the gradients computed in forward.

Three implementations share this chunk loop or its math:
- "triton": the row kernel below (GPU; under TRITON_INTERPRET=1 also on CPU, for tests);
- "reference": the same chunk loop with the row math in plain PyTorch (the CPU path);
- "naive": full logits then F.cross_entropy, the ground truth and the memory baseline.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

try:  # triton ships for Linux only; the reference and naive paths work without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on platforms without triton
    triton = None
    tl = None

IMPLS = ("auto", "triton", "reference", "naive")

# --- chunk sizing -----------------------------------------------------------------------------
# A chunk of C tokens holds C x V logits; each of its GEMMs (logits, dh, dW) re-reads all of W.
# Three forces set C:
#   memory:  C * V * bytes_per_logit <= budget (CUDA: also <= free memory / 4)
#   share:   chunks of ceil(T / MIN_CHUNKS) tokens already hold only 1/8 of naive's logits;
#            cutting finer saves little memory and costs GEMM efficiency, so C is at least that
#   GEMM rate (this is where H enters): a GEMM [C, H] x [H, V] does 2*C*H*V FLOPs over about
#            e*(V*H + C*V) bytes (e = element size), i.e. 2*C*H / (e*(C + H)) FLOP/byte. It runs at
#            the device's matmul rate once that reaches the device's ridge point R (peak FLOP/s
#            over bandwidth), i.e. C >= R*e*H / (2*H - R*e). When 2*H <= R*e no height gets there
#            (W's re-reads dominate), and the largest chunk memory allows is best.
#   C = min(rows_by_memory, max(rows_by_share, rows_for_gemm_rate, MIN_ROWS)), at most T, rounded
#   to ROW_ALIGN (up, unless that would pass the memory budget).
#   On CPU, all T rows in one chunk when their logits are small (CPU_SINGLE_CHUNK_BYTES).
# At V=152064, H=3584, bf16 on an H100 this gives 512 rows for T=4096 and 2048 for T=16384.
MIN_CHUNKS = 8
# 1 GiB of bf16 logits is 3530 tokens at V = 152064: GEMMs of that height already run at the
# device's full matmul rate, so larger chunks would only spend memory.
CUDA_MAX_CHUNK_BYTES = 1 << 30
# A warm GPU may have little free memory left; never take more than this share of it.
CUDA_FREE_MEMORY_SHARE = 4
# H100 SXM: 989 TFLOP/s dense bf16 over 3.35 TB/s HBM3 = 295 FLOP/byte (H200: 206, so H100's
# ridge is the stricter one).
CUDA_RIDGE_FLOP_PER_BYTE = 295
# 128 rows is one tensor-core tile height of cuBLAS' large GEMM kernels; shorter chunks waste it.
CUDA_MIN_ROWS = 128
CUDA_ROW_ALIGN = 128
# On CPU the reference works in place on one fp32 chunk (plus the 16-bit GEMM output for 16-bit
# inputs); 128 MiB is small against the GBs the naive path needs (4 GB at T=2048, V=152064).
CPU_MAX_CHUNK_BYTES = 128 << 20
# Two AVX2 cores: ~200 GFLOP/s fp32 over ~15 GB/s of DRAM bandwidth.
CPU_RIDGE_FLOP_PER_BYTE = 13
CPU_MIN_ROWS = 16
CPU_ROW_ALIGN = 16
# On CPU, logits this small are computed in one chunk: they fit in a core's L2 cache, and each
# extra chunk only adds per-chunk launch work. Measured (fp32, H=128, V=384, one thread, loss +
# both gradients): one chunk 1.55x faster at 140 tokens (0.2 MiB), 1.41x at 600 (0.9 MiB), equal
# at 2000 (2.9 MiB); at 31 MiB the chunked loop was 1.4x faster.
CPU_SINGLE_CHUNK_BYTES = 1 << 20

# --- row kernel launch ------------------------------------------------------------------------
# One program per token row, looping over vocab blocks. 32768 elements with 32 warps is the block
# Liger-Kernel's cross-entropy row kernel uses on H100 (32 fp32 values per thread, no spills).
# Large blocks also matter under the interpreter, whose cost is per block operation: at
# V = 152064, 1024-wide blocks ran 10x slower there than 32768-wide ones.
ROW_BLOCK_V = 32768
CUDA_NUM_WARPS = 32


def resolve_loss_impl(impl: str, device) -> str:
    """Turn the recipe's `loss.impl` into the implementation that runs on `device`.

    "auto" picks "triton" on CUDA and "reference" elsewhere. "triton" off CUDA needs the Triton
    interpreter (TRITON_INTERPRET=1, set before triton is imported), which only tests use.
    """
    if impl not in IMPLS:
        raise ValueError(f"loss.impl={impl!r} is not one of {', '.join(IMPLS)}; set loss.impl to one of them")
    device_type = torch.device(device).type
    if impl == "auto":
        return "triton" if device_type == "cuda" and triton is not None else "reference"
    if impl == "triton":
        if triton is None:
            raise ValueError("loss.impl=triton needs the `triton` package, which is not installed; "
                             "install it or use loss.impl=reference")
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"loss.impl=triton needs a CUDA device (tensors are on {device_type}); use "
                             "loss.impl=reference on CPU, or set TRITON_INTERPRET=1 before importing triton")
    return impl


def choose_chunk_rows(num_tokens, hidden, vocab, element_size, bytes_per_logit, device) -> int:
    """Tokens per chunk, by the rule documented at the top of this file."""
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = min(CUDA_MAX_CHUNK_BYTES, free_bytes // CUDA_FREE_MEMORY_SHARE)
        ridge, min_rows, align = CUDA_RIDGE_FLOP_PER_BYTE, CUDA_MIN_ROWS, CUDA_ROW_ALIGN
    else:
        if num_tokens * vocab * bytes_per_logit <= CPU_SINGLE_CHUNK_BYTES:
            return max(1, num_tokens)
        budget = CPU_MAX_CHUNK_BYTES
        ridge, min_rows, align = CPU_RIDGE_FLOP_PER_BYTE, CPU_MIN_ROWS, CPU_ROW_ALIGN
    rows_by_memory = max(1, budget // (vocab * bytes_per_logit))
    rows_by_share = math.ceil(num_tokens / MIN_CHUNKS)
    ridge_bytes = ridge * element_size
    if 2 * hidden > ridge_bytes:
        rows_for_gemm_rate = math.ceil(ridge_bytes * hidden / (2 * hidden - ridge_bytes))
    else:
        rows_for_gemm_rate = rows_by_memory
    rows = min(rows_by_memory, max(rows_by_share, rows_for_gemm_rate, min_rows))
    rows = math.ceil(rows / align) * align
    if rows > rows_by_memory:  # rounding up must not break the memory budget
        rows = max(align, rows_by_memory // align * align)
    return max(1, min(num_tokens, rows))


# --- row math: PyTorch reference and Triton kernel ----------------------------------------------
def cross_entropy_rows_reference(logits, labels, ignore_index, z_loss, label_smoothing, compute_grad):
    """Per-row loss [C] (fp32) and, if asked, dz [C, V] (fp32) for one chunk of logits.

    Like the Triton kernel it works in place: fp32 logits are overwritten with dz (16-bit logits
    are upcast once), so the chunk never needs a second chunk-sized buffer."""
    z = logits.float()
    vocab = z.shape[1]
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).unsqueeze(1)
    row_max = z.amax(dim=1, keepdim=True)
    z.sub_(row_max)  # shifted logits: lse - z[y] and lse - mean(z) do not change, exp cannot overflow
    z_label = z.gather(1, safe_labels).squeeze(1)
    shifted_mean = z.mean(dim=1) if label_smoothing else 0.0
    sum_exp = z.exp_().sum(dim=1, keepdim=True)
    shifted_lse = sum_exp.log().squeeze(1)
    lse = shifted_lse + row_max.squeeze(1)
    loss = shifted_lse - (1.0 - label_smoothing) * z_label - label_smoothing * shifted_mean + z_loss * lse * lse
    loss = torch.where(valid, loss, 0.0)
    if not compute_grad:
        return loss, None
    dz = z.div_(sum_exp)  # softmax
    if z_loss:
        dz.mul_((1.0 + 2.0 * z_loss * lse).unsqueeze(1))
    if label_smoothing:
        dz.sub_(label_smoothing / vocab)
    dz.scatter_add_(1, safe_labels, torch.full_like(z_label, label_smoothing - 1.0).unsqueeze(1))
    dz.mul_(valid.unsqueeze(1))
    return loss, dz


if triton is not None:

    @triton.jit
    def _cross_entropy_rows_kernel(
        logits_ptr, row_stride, labels_ptr, loss_ptr, vocab, ignore_index, z_loss, label_smoothing,
        COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One logits row: online log-sum-exp over vocab blocks, loss, then dz written in place."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            if COMPUTE_GRAD:
                for start in range(0, vocab, BLOCK_V):
                    cols = start + tl.arange(0, BLOCK_V)
                    zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
                    tl.store(row_ptr + cols, zeros.to(logits_ptr.dtype.element_ty), mask=cols < vocab)
        else:
            running_max = tl.full([], float("-inf"), tl.float32)
            running_sum = tl.zeros([], dtype=tl.float32)
            logit_sum = tl.zeros([], dtype=tl.float32)
            for start in range(0, vocab, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < vocab
                z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(running_max, tl.max(z, axis=0))
                running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
                logit_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
                running_max = new_max
            lse = running_max + tl.log(running_sum)
            z_label = tl.load(row_ptr + label).to(tl.float32)
            smooth_per_class = label_smoothing / vocab
            loss = lse - (1.0 - label_smoothing) * z_label - smooth_per_class * logit_sum + z_loss * lse * lse
            tl.store(loss_ptr + row, loss)
            if COMPUTE_GRAD:
                softmax_scale = 1.0 + 2.0 * z_loss * lse
                for start in range(0, vocab, BLOCK_V):
                    cols = start + tl.arange(0, BLOCK_V)
                    mask = cols < vocab
                    z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                    dz = tl.exp(z - lse) * softmax_scale - smooth_per_class
                    dz = tl.where(cols == label, dz - (1.0 - label_smoothing), dz)
                    tl.store(row_ptr + cols, dz.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows_triton(logits, labels, ignore_index, z_loss, label_smoothing, compute_grad,
                              block_v=None):
    """Triton version of `cross_entropy_rows_reference`; dz overwrites `logits` (same dtype)."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss, logits if compute_grad else None
    on_gpu = logits.device.type == "cuda"
    block_v = min(block_v or ROW_BLOCK_V, triton.next_power_of_2(vocab))
    _cross_entropy_rows_kernel[(rows,)](
        logits, logits.stride(0), labels, loss, vocab, ignore_index, float(z_loss), float(label_smoothing),
        COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=CUDA_NUM_WARPS if on_gpu else 4,
    )
    return loss, logits if compute_grad else None


# --- chunk loop: logits GEMM -> row math -> dh / dW GEMMs ---------------------------------------
@torch.no_grad()
def linear_cross_entropy_chunked(hidden, weight, labels, ignore_index, z_loss, label_smoothing,
                                 need_dh, need_dw, use_triton, chunk_rows=None):
    """Per-token loss [T] (fp32) and the gradients dh [T, H], dW [V, H] of its sum (None if not
    needed), keeping one chunk of logits alive at a time.

    The triton path computes each chunk's logits into one reused buffer of the input dtype and
    the kernel overwrites them with dz; the reference path upcasts each chunk to fp32. dW is
    accumulated in the weight's dtype (as Liger-Kernel does by default), one GEMM per chunk.
    """
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    if chunk_rows is None:
        # triton: logits and dz share one buffer of the input dtype; reference: an fp32 chunk, plus
        # the 16-bit GEMM output it was upcast from when the inputs are 16-bit.
        element = hidden.element_size()
        bytes_per_logit = element if use_triton else 4 + (element if element < 4 else 0)
        chunk_rows = choose_chunk_rows(num_tokens, hidden.shape[1], vocab, hidden.element_size(),
                                       bytes_per_logit, hidden.device)
    rows_fn = cross_entropy_rows_triton if use_triton else cross_entropy_rows_reference
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are ours to choose here
        return _chunk_loop(hidden, weight, labels, ignore_index, z_loss, label_smoothing, need_dh, need_dw,
                           use_triton, chunk_rows, rows_fn)


def _chunk_loop(hidden, weight, labels, ignore_index, z_loss, label_smoothing, need_dh, need_dw, use_triton,
                chunk_rows, rows_fn):
    """logits GEMM -> row math (in place) -> dh / dW GEMMs, one chunk of tokens at a time."""
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    compute_grad = need_dh or need_dw
    per_token = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    buffer = None
    if use_triton:
        buffer = torch.empty(min(chunk_rows, num_tokens), vocab, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, num_tokens, chunk_rows):
        end = min(start + chunk_rows, num_tokens)
        h = hidden[start:end]
        if buffer is not None:
            logits = torch.mm(h, weight.t(), out=buffer[: end - start])
        else:
            logits = h @ weight.t()
        loss, dz = rows_fn(logits, labels[start:end], ignore_index, z_loss, label_smoothing, compute_grad)
        per_token[start:end] = loss
        if compute_grad:
            dz = dz.to(weight.dtype)
            if need_dh:
                torch.mm(dz, weight, out=dh[start:end])
            if need_dw:
                dw.addmm_(dz.t(), h)
        del logits, dz  # free this chunk before the next one is allocated
    return per_token, dh, dw


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Sum of per-token losses; gradients are computed in forward and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, z_loss, label_smoothing, use_triton):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        per_token, dh, dw = linear_cross_entropy_chunked(
            hidden, weight, labels, ignore_index, z_loss, label_smoothing, need_dh, need_dw, use_triton)
        ctx.save_for_backward(dh, dw)
        ctx.backward_done = False
        ctx.mark_non_differentiable(per_token)
        return per_token.sum(), per_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_per_token):
        if ctx.backward_done:
            raise RuntimeError("linear_cross_entropy: backward ran twice through the same loss; its "
                               "gradients are scaled in place, so call the loss again instead of retain_graph")
        ctx.backward_done = True
        dh, dw = ctx.saved_tensors
        # In place: the caller's scale (e.g. 1 / global token count) arrives here as grad_loss.
        dh = dh.mul_(grad_loss) if dh is not None else None
        dw = dw.mul_(grad_loss) if dw is not None else None
        return dh, dw, None, None, None, None, None


def linear_cross_entropy_naive(hidden, weight, labels, ignore_index, z_loss, label_smoothing):
    """Per-token loss [T] from the full fp32 logits: the ground truth and the memory baseline."""
    logits = (hidden @ weight.t()).float()
    per_token = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none",
                                label_smoothing=label_smoothing)
    if z_loss:
        lse = torch.logsumexp(logits, dim=1)
        per_token = per_token + z_loss * torch.where(labels != ignore_index, lse * lse, 0.0)
    return per_token


# --- public entry point ------------------------------------------------------------------------
def _is_sharded(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def _check_inputs(hidden, weight, labels, ignore_index, task_ids, num_tasks):
    if _is_sharded(weight) or _is_sharded(hidden):
        raise ValueError("linear_cross_entropy: weight (or hidden) is a sharded DTensor; call the loss inside "
                         "the forward of the FSDP2 module that owns the lm_head/embedding, where FSDP2 has "
                         "gathered it into an ordinary tensor")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden must be [T, H] and weight [V, H]; got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)} (flatten batch and time first)")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"linear_cross_entropy: labels must be [T] = [{hidden.shape[0]}] (already shifted); "
                         f"got {tuple(labels.shape)}")
    if (task_ids is None) != (num_tasks == 0):
        raise ValueError("linear_cross_entropy: pass task_ids [T] together with num_tasks > 0, or neither; got "
                         f"task_ids={'None' if task_ids is None else tuple(task_ids.shape)}, num_tasks={num_tasks}")
    if task_ids is not None and task_ids.shape != labels.shape:
        raise ValueError(f"linear_cross_entropy: task_ids must be [T] like labels; got {tuple(task_ids.shape)}")
    vocab = weight.shape[0]
    valid = labels != ignore_index
    bad_label = valid & ((labels < 0) | (labels >= vocab))
    checks = [bad_label.any()]
    if task_ids is not None:
        checks.append(((task_ids < 0) | (task_ids >= num_tasks)).any())
    bad = torch.stack(checks).tolist()  # one device sync for all checks
    if bad[0]:
        where = int(bad_label.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: label {int(labels[where])} at token {where} is outside the "
                         f"vocabulary [0, {vocab}) and is not ignore_index={ignore_index}; check the tokenizer "
                         "matches the model's vocabulary")
    if len(bad) > 1 and bad[1]:
        raise ValueError(f"linear_cross_entropy: task_ids must lie in [0, {num_tasks}); got values "
                         f"{sorted(set(task_ids.tolist()))}")


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, task_ids=None, num_tasks=0,
                         z_loss=0.0, label_smoothing=0.0, impl="auto"):
    """Cross-entropy of `hidden @ weight.T` against `labels`, summed over valid tokens.

    hidden [T, H]; weight [V, H] (an lm_head or tied embedding matrix; gradients reach it only when
    it requires grad); labels [T], already shifted, `ignore_index` where no loss is taken;
    task_ids [T] long with num_tasks > 0 for per-task sums. A weight of another dtype than hidden
    is cast to hidden's dtype (differentiably; costs one copy of the weight).

    Returns (loss_sum, n_valid, per_task_loss_sum): loss_sum a differentiable fp32 scalar (divide
    by the global count of valid tokens yourself), n_valid a 0-d int64 tensor, per_task_loss_sum
    [num_tasks] fp32, detached, summing to loss_sum.
    """
    _check_inputs(hidden, weight, labels, ignore_index, task_ids, num_tasks)
    impl = resolve_loss_impl(impl, hidden.device)
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    hidden, labels = hidden.contiguous(), labels.long().contiguous()
    n_valid = (labels != ignore_index).sum()
    if impl == "naive":
        per_token = linear_cross_entropy_naive(hidden, weight, labels, ignore_index, z_loss, label_smoothing)
        loss_sum = per_token.sum()
    elif torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss_sum, per_token = LinearCrossEntropyFunction.apply(
            hidden, weight, labels, ignore_index, z_loss, label_smoothing, impl == "triton")
    else:  # evaluation: loss only, no gradient work at all
        per_token, _, _ = linear_cross_entropy_chunked(
            hidden, weight, labels, ignore_index, z_loss, label_smoothing, False, False, impl == "triton")
        loss_sum = per_token.sum()
    per_task = torch.zeros(num_tasks, dtype=torch.float32, device=hidden.device)
    if task_ids is not None:
        per_task.index_add_(0, task_ids.to(hidden.device), per_token.detach())
    return loss_sum, n_valid, per_task
