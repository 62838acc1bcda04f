"""kernels/lora_grouped.py: lora_qkv and lora_mlp (Triton, interpreted on CPU) against their unfused
PyTorch reference, and the grouped reference against separate lora_linear calls with the group's
masks. Shapes, tolerances and the NaN-poisoned buffers as in tests/kernels/test_lora.py:
    pytest tests/kernels/test_lora_grouped.py -m gpu     # the bf16 cases on a GPU
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.lora import lora_linear_reference
from kernels.lora_grouped import _down_seed, lora_mlp, lora_mlp_reference, lora_qkv, lora_qkv_reference
from test_lora import CASES, IMPLS, K, M, N, SCALE, assert_close, make_linear, poisoned, rand_input, run  # noqa: F401


# ----------------------------------------------------------------------------- grouped variants
def qkv_params(device, dtype, rank):
    # Grouped-query attention in miniature: k and v narrower than q, as in Qwen2.5.
    shapes = [(N, 1), (31, 2), (31, 3)]
    parts = [make_linear(device, dtype, rank, bias=True, n=n, seed=s) for n, s in shapes]
    return [list(t) for t in zip(*parts)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("device,dtype", CASES)
def test_lora_qkv_matches_unfused_reference(poisoned, device, dtype, dropout_p, impl):
    weights, As, Bs, biases = qkv_params(device, dtype, 8)
    x = rand_input(device, dtype, M, K)
    inputs = (x, *As, *Bs)
    got = run(lambda: lora_qkv(x, weights, As, Bs, SCALE, biases, dropout_p, 7, impl=impl), inputs)
    want = run(lambda: lora_qkv_reference(x, weights, As, Bs, SCALE, biases, dropout_p, 7), inputs)
    names = ["q", "k", "v", "dx", "dAq", "dAk", "dAv", "dBq", "dBk", "dBv"]
    for name, a, e in zip(names, got[0] + got[1], want[0] + want[1]):
        assert_close(name, a, e, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("device,dtype", CASES)
def test_lora_mlp_matches_unfused_reference(poisoned, device, dtype, dropout_p, impl):
    inter = 77
    parts = [make_linear(device, dtype, 4, bias=False, k=k, n=n, seed=s)
             for k, n, s in [(K, inter, 1), (K, inter, 2), (inter, K, 3)]]
    weights, As, Bs, _ = [list(t) for t in zip(*parts)]
    x = rand_input(device, dtype, 5, 9, K)
    inputs = (x, *As, *Bs)
    got = run(lambda: lora_mlp(x, weights, As, Bs, SCALE, dropout_p, 8, impl=impl), inputs)
    want = run(lambda: lora_mlp_reference(x, weights, As, Bs, SCALE, dropout_p, 8), inputs)
    names = ["out", "dx", "dA_gate", "dA_up", "dA_down", "dB_gate", "dB_up", "dB_down"]
    for name, a, e in zip(names, got[0] + got[1], want[0] + want[1]):
        assert_close(name, a, e, dtype)


def test_mlp_reference_is_swiglu_of_separate_linears():
    """The grouped reference itself equals three lora_linear calls (mask seeds included)."""
    parts = [make_linear("cpu", torch.float32, 4, bias=False, k=k, n=n, seed=s)
             for k, n, s in [(K, 40, 1), (K, 40, 2), (40, K, 3)]]
    (wg, wu, wd), (ag, au, ad), (bg, bu, bd), _ = [list(t) for t in zip(*parts)]
    x = rand_input("cpu", torch.float32, 6, K)
    seed = 21
    h = F.silu(lora_linear_reference(x, wg, ag, bg, SCALE, None, 0.1, seed)) \
        * lora_linear_reference(x, wu, au, bu, SCALE, None, 0.1, seed)
    want = lora_linear_reference(h, wd, ad, bd, SCALE, None, 0.1, _down_seed(seed))
    got = lora_mlp(x, [wg, wu, wd], [ag, au, ad], [bg, bu, bd], SCALE, 0.1, seed, impl="reference")
    assert torch.equal(got, want)


@pytest.mark.parametrize("rng", ["philox", "torch"])
def test_qkv_reference_is_three_linears_with_the_group_mask(rng):
    """The reference draws the group's mask once; q, k, v equal separate calls given the group's seed."""
    weights, As, Bs, biases = qkv_params("cpu", torch.float32, 4)
    x = rand_input("cpu", torch.float32, 3, 7, K)
    seed = 31
    got = lora_qkv_reference(x, weights, As, Bs, SCALE, biases, 0.2, seed, rng=rng)
    for name, y, w, a, b, bias in zip("qkv", got, weights, As, Bs, biases):
        assert torch.equal(y, lora_linear_reference(x, w, a, b, SCALE, bias, 0.2, seed, rng=rng)), name
    assert not torch.equal(got[0], lora_qkv_reference(x, weights, As, Bs, SCALE, biases, 0.2, seed + 1, rng=rng)[0])
