"""kernels/lora.py: the Triton path against the PyTorch reference, PEFT's LoraLayer and the formulas
(the grouped variants of kernels/lora_grouped.py: tests/kernels/test_lora_grouped.py).

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) in fp32 and fp16 (bf16 tl.dot
is wrong under the interpreter); bf16 runs on a GPU through the `gpu` marker:
    pytest tests/kernels/test_lora.py -m gpu
Shapes are odd on purpose (M=47, K=123, N=95) so every tile edge is masked; B is random, never
PEFT's zeros; every buffer the module allocates is poisoned with NaN before the kernels run.
"""
import pytest
import torch

from kernels import lora as lora_mod
from kernels.lora import (
    dropout_keep_mask, lora_linear, lora_linear_reference, materialize_keep_mask, resolve_lora_impl,
)

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Max error relative to the largest reference value. fp32: the kernels accumulate in another
# order than the reference; fp16/bf16: a few ulps of the 16-bit rounding of inputs and results.
REL_TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
M, K, N = 47, 123, 95
SCALE = 2.0  # alpha / r with alpha = 2r: not 1, so a missing scale shows

CPU_CASES = [pytest.param("cpu", torch.float32, id="cpu-fp32"), pytest.param("cpu", torch.float16, id="cpu-fp16")]
# The engine trains in bf16 on GPUs; fp32/fp16 are covered on CPU.
GPU_CASES = [pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=(gpu, needs_cuda))]
CASES = CPU_CASES + GPU_CASES


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty / empty_like return NaN-filled floats (int8: -1) while kernels run."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def assert_close(name, actual, expected, dtype):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: {(~torch.isfinite(actual)).sum()} non-finite (unwritten?)"
    err = (actual - expected).abs()
    bound = REL_TOL[dtype] * expected.abs().max().clamp_min(1e-6)
    if err.max() > bound:
        idx = err.argmax()
        pytest.fail(f"{name}: max err {err.max():.3g} > {bound:.3g} at flat index {idx.item()}: "
                    f"got {actual.flatten()[idx]:.6g}, expected {expected.flatten()[idx]:.6g}")


def make_linear(device, dtype, rank, bias=True, k=K, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)
    weight = rnd(n, k, std=k ** -0.5)
    lora_A = rnd(rank, k, std=k ** -0.5).requires_grad_()
    lora_B = rnd(n, rank, std=rank ** -0.5).requires_grad_()
    return weight, lora_A, lora_B, (rnd(n) if bias else None)


def rand_input(device, dtype, *shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()


def run(fn, inputs, grad_out_seed=2):
    """Outputs of fn() and the grads of `inputs` for a fixed random upstream gradient."""
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(grad_out_seed)
    grads_out = [torch.randn(o.shape, generator=g).to(o) for o in outs]
    grads = torch.autograd.grad(outs, inputs, grads_out)
    return [o.detach() for o in outs], list(grads)


# ----------------------------------------------------------------------------- choice of implementation
def test_resolve_lora_impl(monkeypatch):
    assert resolve_lora_impl("auto", "cpu") == "torch"
    assert resolve_lora_impl("reference", "cpu") == "reference"
    assert resolve_lora_impl("auto", torch.device("cuda", 0)) == "triton"
    with pytest.raises(ValueError, match="not known"):
        resolve_lora_impl("fused", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_lora_impl("triton", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_lora_impl("triton_gemm", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_lora_impl("triton", "cpu") == "triton"
    assert resolve_lora_impl("triton_gemm", "cpu") == "triton_gemm"


def test_bad_shapes_and_dropout_are_explained():
    weight, lora_A, lora_B, bias = make_linear("cpu", torch.float32, 4)
    x = rand_input("cpu", torch.float32, 5, K)
    with pytest.raises(ValueError, match="PEFT's orientation"):
        lora_linear(x, weight, lora_B, lora_A, SCALE, impl="reference")
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, weight, lora_A, lora_B, SCALE, dropout_p=1.0, impl="reference")


# ----------------------------------------------------------------------------- dropout mask
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=(gpu, needs_cuda))])
@pytest.mark.parametrize("seed", [0, 77, 2**31 - 5])
def test_kernel_mask_equals_reference_mask(poisoned, seed, device):
    kernel_mask = materialize_keep_mask(seed, 40, 130, 0.3, device)
    torch_mask = dropout_keep_mask(seed, 40, 130, 0.3, device)
    assert torch.equal(kernel_mask, torch_mask), f"{(kernel_mask != torch_mask).sum()} elements differ"


def test_mask_keep_rate_and_seed_dependence():
    p = 0.25
    mask = dropout_keep_mask(123, 300, 400, p, "cpu")
    # 120k Bernoulli(0.75) draws: standard deviation of the rate 0.00125; 0.01 is 8 sigma.
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01
    # rows and columns are not correlated copies of each other
    assert abs(mask[:, 0].float().mean().item() - (1 - p)) < 0.1
    assert not torch.equal(mask[0], mask[1])
    assert torch.equal(mask, dropout_keep_mask(123, 300, 400, p, "cpu"))
    assert not torch.equal(mask, dropout_keep_mask(124, 300, 400, p, "cpu"))


# ----------------------------------------------------------------------------- lora_linear
# Both Triton paths: kernels around cuBLAS GEMMs, and the GEMM with the rank-r term inside.
IMPLS = ["triton", "triton_gemm"]


# Every rank with a bias, and the bias-free path once per rank class (padded 8 -> 16).
RANK_BIAS = [pytest.param(1, True, id="r1-bias"), pytest.param(8, True, id="r8-bias"),
             pytest.param(16, True, id="r16-bias"), pytest.param(8, False, id="r8-nobias")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rank,bias", RANK_BIAS)
@pytest.mark.parametrize("device,dtype", CASES)
def test_lora_linear_matches_reference(poisoned, device, dtype, rank, bias, impl):
    weight, lora_A, lora_B, b = make_linear(device, dtype, rank, bias)
    x = rand_input(device, dtype, M, K)
    inputs = (x, lora_A, lora_B)
    got = run(lambda: lora_linear(x, weight, lora_A, lora_B, SCALE, b, impl=impl), inputs)
    want = run(lambda: lora_linear_reference(x, weight, lora_A, lora_B, SCALE, b), inputs)
    for name, a, e in zip(["y", "dx", "dA", "dB"], got[0] + got[1], want[0] + want[1]):
        assert_close(name, a, e, dtype)


@pytest.mark.parametrize("rank", [1, 8, 16])
@pytest.mark.parametrize("device,dtype", CASES)
def test_lora_linear_matches_peft_lora_layer(poisoned, device, dtype, rank):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    weight, lora_A, lora_B, b = make_linear(device, dtype, rank)
    base = torch.nn.Linear(K, N, device=device, dtype=dtype)
    base.weight.data.copy_(weight)
    base.bias.data.copy_(b)
    config = LoraConfig(r=rank, lora_alpha=SCALE * rank, lora_dropout=0.0)
    layer = PeftLoraLinear(base, "default", config=config, r=rank, lora_alpha=SCALE * rank, lora_dropout=0.0)
    layer.to(device=device, dtype=dtype)
    peft_A, peft_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    peft_A.data.copy_(lora_A)
    peft_B.data.copy_(lora_B)  # random, not PEFT's zeros
    x = rand_input(device, dtype, 3, 17, K)  # leading shape kept
    got = run(lambda: lora_linear(x, weight, lora_A, lora_B, SCALE, b, impl="triton"), (x, lora_A, lora_B))
    want = run(lambda: layer(x), (x, peft_A, peft_B))
    for name, a, e in zip(["y", "dx", "dA", "dB"], got[0] + got[1], want[0] + want[1]):
        assert_close(name, a, e, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,dtype", CASES)
def test_dropout_same_seed_same_result_and_matches_reference(poisoned, device, dtype, impl):
    p, seed = 0.3, 4242
    weight, lora_A, lora_B, b = make_linear(device, dtype, 8)
    x = rand_input(device, dtype, M, K)
    inputs = (x, lora_A, lora_B)
    first = run(lambda: lora_linear(x, weight, lora_A, lora_B, SCALE, b, p, seed, impl=impl), inputs)
    again = run(lambda: lora_linear(x, weight, lora_A, lora_B, SCALE, b, p, seed, impl=impl), inputs)
    other = run(lambda: lora_linear(x, weight, lora_A, lora_B, SCALE, b, p, seed + 1, impl=impl), inputs)
    for a, e in zip(first[0] + first[1], again[0] + again[1]):
        assert torch.equal(a, e)
    assert not torch.equal(first[1][1], other[1][1]), "another seed must give another mask"
    # The reference draws the kernel's mask (checked above), so the two agree with dropout on.
    want = run(lambda: lora_linear_reference(x, weight, lora_A, lora_B, SCALE, b, p, seed), inputs)
    for name, a, e in zip(["y", "dx", "dA", "dB"], first[0] + first[1], want[0] + want[1]):
        assert_close(name, a, e, dtype)


def test_dropout_gradients_follow_the_formulas(poisoned):
    """dB = s dy^T (x~ A^T); dA = s (dy B)^T x~; dx = dy W + (m/(1-p)) * s (dy B) A, in float64."""
    p, seed, dtype = 0.2, 99, torch.float32
    weight, lora_A, lora_B, b = make_linear("cpu", dtype, 8)
    x = rand_input("cpu", dtype, M, K)
    (y,), (dx, dA, dB) = run(lambda: lora_linear(x, weight, lora_A, lora_B, SCALE, b, p, seed, impl="triton"),
                             (x, lora_A, lora_B))
    m = materialize_keep_mask(seed, M, K, p, "cpu").double()
    xd, W, A, B = (t.detach().double() for t in (x, weight, lora_A, lora_B))
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).double()
    x_tilde = m * xd / (1 - p)
    assert 0.7 < m.mean() < 0.9
    assert_close("y", y, xd @ W.T + b.double() + SCALE * (x_tilde @ A.T) @ B.T, dtype)
    assert_close("dB", dB, SCALE * dy.T @ (x_tilde @ A.T), dtype)
    assert_close("dA", dA, SCALE * (dy @ B).T @ x_tilde, dtype)
    assert_close("dx", dx, dy @ W + m / (1 - p) * (SCALE * (dy @ B) @ A), dtype)


def test_strided_input_and_fp32_adapters_with_fp16_input(poisoned):
    dtype = torch.float16
    weight, lora_A, lora_B, b = make_linear("cpu", dtype, 8)
    wide = rand_input("cpu", dtype, M, 2 * K)
    x = wide[:, ::2]  # non-contiguous view: kernels read through strides
    A32 = lora_A.detach().float().requires_grad_()
    B32 = lora_B.detach().float().requires_grad_()
    got = run(lambda: lora_linear(x, weight, A32, B32, SCALE, b, 0.1, 5, impl="triton"), (wide, A32, B32))
    want = run(lambda: lora_linear_reference(x, weight, lora_A, lora_B, SCALE, b, 0.1, 5), (wide, lora_A, lora_B))
    assert got[1][1].dtype == torch.float32 and got[1][2].dtype == torch.float32
    for name, a, e in zip(["y", "dwide", "dA", "dB"], got[0] + got[1], want[0] + want[1]):
        assert_close(name, a, e, dtype)


def test_input_without_grad_still_trains_the_adapters(poisoned):
    weight, lora_A, lora_B, b = make_linear("cpu", torch.float32, 8)
    x = rand_input("cpu", torch.float32, M, K).detach()
    got = run(lambda: lora_linear(x, weight, lora_A, lora_B, SCALE, b, 0.1, 4, impl="triton"), (lora_A, lora_B))
    want = run(lambda: lora_linear_reference(x, weight, lora_A, lora_B, SCALE, b, 0.1, 4), (lora_A, lora_B))
    for name, a, e in zip(["y", "dA", "dB"], got[0] + got[1], want[0] + want[1]):
        assert_close(name, a, e, torch.float32)


def test_grad_A_split_reduction_equals_single_pass(poisoned):
    """On CUDA dA reduces over row chunks in parallel; the chunking must not change the sum."""
    g = torch.Generator().manual_seed(3)
    gB, x = torch.randn(M, 8, generator=g), torch.randn(M, K, generator=g)
    single = lora_mod.lora_grad_A(gB, x, SCALE, 0.3, 11, splits=1)
    split = lora_mod.lora_grad_A(gB, x, SCALE, 0.3, 11, splits=3)
    m = dropout_keep_mask(11, M, K, 0.3, "cpu").float()
    assert_close("dA splits=3", split, single, torch.float32)
    assert_close("dA", single, SCALE * gB.T @ (m * x / 0.7), torch.float32)


@gpu
@needs_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_bf16_large_tiles_against_fp32_reference(poisoned, dropout_p, impl):
    """Autotuned tiles, several dA row chunks, rank padded 8 -> 16; truth computed in fp32."""
    m, k, n, rank, dtype = 1537, 1000, 777, 8, torch.bfloat16
    weight, lora_A, lora_B, b = make_linear("cuda", dtype, rank, k=k, n=n)
    x = rand_input("cuda", dtype, m, k)
    got = run(lambda: lora_linear(x, weight, lora_A, lora_B, SCALE, b, dropout_p, 3, impl=impl),
              (x, lora_A, lora_B))
    x32, A32, B32 = (t.detach().float().requires_grad_() for t in (x, lora_A, lora_B))
    want = run(lambda: lora_linear_reference(x32, weight.float(), A32, B32, SCALE, b.float(), dropout_p, 3),
               (x32, A32, B32))
    for name, a, e in zip(["y", "dx", "dA", "dB"], got[0] + got[1], want[0] + want[1]):
        assert_close(name, a, e, dtype)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_activation_checkpointing_replays_the_mask(impl):
    """A seed drawn from torch's RNG (seed=None) is redrawn identically on recompute."""
    from torch.utils.checkpoint import checkpoint

    weight, lora_A, lora_B, b = make_linear("cpu", torch.float32, 8)
    x = rand_input("cpu", torch.float32, M, K)
    layer = lambda t: lora_linear(t, weight, lora_A, lora_B, SCALE, b, 0.3, None, impl=impl)
    torch.manual_seed(5)
    plain = run(lambda: layer(x), (x, lora_A, lora_B))
    torch.manual_seed(5)
    ckpt = run(lambda: checkpoint(layer, x, use_reentrant=False), (x, lora_A, lora_B))
    for a, e in zip(plain[0] + plain[1], ckpt[0] + ckpt[1]):
        assert torch.equal(a, e)
    torch.manual_seed(6)
    assert not torch.equal(run(lambda: layer(x), (x, lora_A, lora_B))[0][0], plain[0][0])


def test_torch_rng_impl_is_the_same_math_with_its_own_seeded_mask():
    """impl="torch" (the CPU default): deterministic for a seed, a different seed draws a
    different mask, keep rate ~ 1 - p, and with dropout 0 it equals the reference exactly."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(47, 123, generator=g)
    w, a, b = torch.randn(95, 123, generator=g), torch.randn(8, 123, generator=g), torch.randn(95, 8, generator=g)
    y0 = lora_linear(x, w, a, b, 2.0, dropout_p=0.0, impl="torch")
    torch.testing.assert_close(y0, lora_linear(x, w, a, b, 2.0, dropout_p=0.0, impl="reference"))
    y1 = lora_linear(x, w, a, b, 2.0, dropout_p=0.3, seed=11, impl="torch")
    torch.testing.assert_close(y1, lora_linear(x, w, a, b, 2.0, dropout_p=0.3, seed=11, impl="torch"), rtol=0, atol=0)
    assert not torch.allclose(y1, lora_linear(x, w, a, b, 2.0, dropout_p=0.3, seed=12, impl="torch"))
    # keep rate: the adapter input x~ = mask * x / (1 - p); recover the mask from x~ A^T with A = I
    eye = torch.eye(123)
    probe = lora_linear(x, torch.zeros(123, 123), eye, eye, 1.0, dropout_p=0.3, seed=11, impl="torch")
    kept = (probe != 0).float().mean().item()
    assert abs(kept - 0.7) < 0.03
