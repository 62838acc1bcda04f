"""engine/attention.py: a packed row equals its samples run alone (audio encoder, LLM logits,
losses, LoRA gradients) under each backend that runs here; backend selection; Liger's ops on
the LLM equal the unpatched model (Triton interpreter on CPU).

Tolerances are fp32: packed and alone differ only in summation order of the same math
(different matmul shapes and attention tiling), measured at ~1e-6; 1e-4 leaves margin.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine import attention
from engine.attention import (SDPA_VARLEN_IMPL, apply_liger, llm_attention_mask, packed_hidden_states,
                              reference_varlen_attn, register_varlen_attention, resolve_attn_backend,
                              set_attn_backend, set_attn_implementation)
from engine.config import LoRAConfig, LossConfig, ModelConfig
from engine.model import IGNORE_INDEX, build_model, text_position_ids
from engine.tokenizer import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, IM_END, IM_START, build_tiny_tokenizer
from loaders.batching import collate
from loaders.packing import collate_packed
from loaders.stream import Example
from loaders.tasks import TASKS
from synthetic_batches import audio_tokens, make_batch

CPU = torch.device("cpu")
FP32_ATOL = 1e-4  # see module docstring
FP32_RTOL = 1e-4
REFERENCE_VARLEN = "reference_flash_varlen"  # the varlen path with its PyTorch ground-truth kernel


def examples_of(batch: dict) -> list[Example]:
    out = []
    for row, (key, task) in enumerate(zip(batch["keys"], batch["tasks"])):
        n = int(batch["attention_mask"][row].sum())
        frames = int(batch["feature_attention_mask"][row].sum())
        out.append(Example(key=key, shard="synthetic", task=task, label=None, epoch=0,
                           input_ids=batch["input_ids"][row, :n].numpy(), labels=batch["labels"][row, :n].numpy(),
                           features=batch["input_features"][row, :, :frames].numpy(), audio_seconds=frames / 100))
    return out


def short_examples(tokenizer) -> list[Example]:
    """Two short samples (the Triton interpreter runs Liger's kernels one row at a time)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS, IM_START, IM_END)}
    rng = np.random.default_rng(5)
    out = []
    for i, (frames, target) in enumerate([(40, [150, 161, 152]), (24, [170, 158])]):
        prompt = [ids[IM_START], 20, ids[AUDIO_BOS]] + [ids[AUDIO_TOKEN]] * audio_tokens(frames) + [ids[AUDIO_EOS], ids[IM_END]]
        seq = np.array(prompt + target + [ids[IM_END]])
        labels = np.array([IGNORE_INDEX] * len(prompt) + target + [ids[IM_END]])
        out.append(Example(key=f"short-{i}", shard="synthetic", task=TASKS[i], label=None, epoch=0, input_ids=seq,
                           labels=labels, features=rng.standard_normal((128, frames)).astype(np.float32),
                           audio_seconds=frames / 100))
    return out


def build(seed: int = 0, device=CPU):
    tokenizer = build_tiny_tokenizer()
    model = build_model(ModelConfig(seed=seed), LoRAConfig(dropout=0.0), LossConfig(impl="reference"), tokenizer,
                        torch.device(device))
    torch.manual_seed(seed + 7)
    with torch.no_grad():  # non-zero B so the adapters change the outputs and A gets gradients
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model, tokenizer


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = build()
    examples = examples_of(make_batch(tokenizer, seed=11, batch_size=4))
    assert len({e.num_tokens for e in examples}) > 1, "the samples must differ in length"
    register_varlen_attention(REFERENCE_VARLEN, reference_varlen_attn)
    assert set_attn_backend(model.thinker, "sdpa_varlen") == SDPA_VARLEN_IMPL  # registers it
    set_attn_implementation(model.thinker, "sdpa")
    return model, tokenizer, examples


def lora_grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


def sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF-convention summed cross-entropy of one sample: logits [T, V], labels [T]."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")


def on_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) and k != "cu_seqlens" else v for k, v in batch.items()}


def run_alone(model, tokenizer, examples):
    model.zero_grad()
    logits, losses = [], []
    for e in examples:
        batch = on_device(collate([e], tokenizer.pad_token_id), model.lm_head.weight.device)
        out = model.lm_head(model.hidden_states(batch))[0].float()
        losses.append(sample_loss(out, batch["labels"][0]))
        logits.append(out.detach())
    torch.stack(losses).sum().backward()
    return logits, [l.detach() for l in losses], lora_grads(model)


def run_packed(model, tokenizer, examples):
    model.zero_grad()
    batch = on_device(collate_packed(examples, tokenizer.pad_token_id), model.lm_head.weight.device)
    out = model.lm_head(packed_hidden_states(model, batch))[0].float()
    cu = batch["cu_seqlens"].tolist()
    losses = [sample_loss(out[a:b], batch["labels"][0, a:b]) for a, b in zip(cu[:-1], cu[1:])]
    torch.stack(losses).sum().backward()
    logits = [out[a:b].detach() for a, b in zip(cu[:-1], cu[1:])]
    return logits, [l.detach() for l in losses], lora_grads(model)


def assert_close(got, want, what):
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("impl", ["sdpa", "eager", REFERENCE_VARLEN, SDPA_VARLEN_IMPL])
def test_packed_row_equals_each_sample_alone(setup, impl):
    model, tokenizer, examples = setup
    set_attn_implementation(model.thinker, "sdpa")
    alone = run_alone(model, tokenizer, examples)
    set_attn_implementation(model.thinker, impl)
    try:
        packed = run_packed(model, tokenizer, examples)
    finally:
        set_attn_implementation(model.thinker, "sdpa")
    for i, (got, want) in enumerate(zip(packed[0], alone[0])):
        assert_close(got, want, f"{impl}: logits of sample {i}")
    assert_close(torch.stack(packed[1]), torch.stack(alone[1]), f"{impl}: per-sample losses")
    assert set(packed[2]) == set(alone[2]) and alone[2]
    for name in alone[2]:
        assert alone[2][name].abs().max() > 0, name
        assert_close(packed[2][name], alone[2][name], f"{impl}: gradient of {name}")


def test_a_2d_mask_on_a_packed_row_lets_samples_see_each_other(setup):
    """The trap the packed path avoids: with attention_mask given, transformers ignores the
    per-sample positions and the later samples attend to the earlier ones."""
    model, tokenizer, examples = setup
    batch = collate_packed(examples[:2], tokenizer.pad_token_id)
    with torch.no_grad():
        good = packed_hidden_states(model, batch)
        embeds = model.embed(batch["input_ids"], model.encode_audio(batch["input_features"], batch["feature_attention_mask"]))
        leaky = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                          use_cache=False).last_hidden_state
    first = examples[0].num_tokens
    assert torch.allclose(good[0, :first], leaky[0, :first], atol=FP32_ATOL)
    assert not torch.allclose(good[0, first:], leaky[0, first:], atol=1e-2)


def test_audio_of_a_packed_batch_equals_each_clip_alone(setup, tokenizer=None):
    model, tokenizer, examples = setup
    batch = collate_packed(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        together = model.encode_audio(batch["input_features"], batch["feature_attention_mask"])
        alone = [model.encode_audio(torch.from_numpy(e.features)[None], torch.ones(1, e.features.shape[1], dtype=torch.long))
                 for e in examples]
    assert_close(together, torch.cat(alone), "audio tokens")


def test_audio_encoder_under_a_varlen_backend_equals_sdpa(setup):
    """A "flash"-named implementation makes the encoder hand all windows of all clips to one
    varlen call (instead of a loop over windows): same audio tokens."""
    model, tokenizer, examples = setup
    batch = collate_packed(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        want = model.encode_audio(batch["input_features"], batch["feature_attention_mask"])
        set_attn_implementation(model.thinker, REFERENCE_VARLEN)
        try:
            got = model.encode_audio(batch["input_features"], batch["feature_attention_mask"])
        finally:
            set_attn_implementation(model.thinker, "sdpa")
    assert_close(got, want, "audio tokens under varlen")


def test_position_rows_equal_transformers_rope_index_of_each_sample(setup):
    model, tokenizer, examples = setup
    batch = collate_packed(examples, tokenizer.pad_token_id)
    cu = batch["cu_seqlens"].tolist()
    # transformers moved get_rope_index from the thinker to its inner model during 5.x
    owner = model.thinker.model if hasattr(model.thinker.model, "get_rope_index") else model.thinker
    for e, a, b in zip(examples, cu[:-1], cu[1:]):
        ids = torch.from_numpy(e.input_ids)[None]
        want, _ = owner.get_rope_index(ids, None, None, torch.ones_like(ids), False,
                                       torch.tensor([e.features.shape[1]]), None)
        assert torch.equal(batch["position_ids"][1:, :, a:b], want), e.key
        assert batch["position_ids"][0, 0, a:b].tolist() == list(range(b - a))


def test_varlen_function_unpads_a_padded_batch(setup):
    model, tokenizer, examples = setup
    batch = collate(examples, tokenizer.pad_token_id)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        want = model.hidden_states(batch)
        set_attn_implementation(model.thinker, REFERENCE_VARLEN)
        try:
            got = model.hidden_states(batch)
        finally:
            set_attn_implementation(model.thinker, "sdpa")
    assert_close(got[real], want[real], "hidden states of real tokens")


def test_backend_selection_and_errors(monkeypatch):
    assert resolve_attn_backend("auto", CPU) == "sdpa"
    assert resolve_attn_backend("auto", CPU, packing=True) == "sdpa_varlen"  # per-sample SDPA for packed rows
    assert resolve_attn_backend("sdpa", CPU, packing=True) == "sdpa"
    assert resolve_attn_backend("sdpa", CPU) == "sdpa"
    assert resolve_attn_backend("eager", CPU) == "eager"
    with pytest.raises(ValueError, match="flash_attn is not available on cpu.*flash-attn.*Available here: sdpa_varlen, sdpa, eager"):
        resolve_attn_backend("flash_attn", CPU)
    with pytest.raises(ValueError, match="torch_varlen is not available on cpu.*Available here: sdpa"):
        resolve_attn_backend("torch_varlen", CPU)
    with pytest.raises(ValueError, match="'flash' is not a backend; use auto, flash_attn, torch_varlen, sdpa_varlen, sdpa, eager"):
        resolve_attn_backend("flash", CPU)
    assert attention.resolve_liger("auto", CPU) is False and attention.resolve_liger(False, "cuda") is False
    with pytest.raises(ValueError, match="model.liger=true needs CUDA.*on cpu"):
        attention.resolve_liger(True, CPU)
    with pytest.raises(ValueError, match="model.liger='yes'; use auto, true or false"):
        attention.resolve_liger("yes", CPU)
    monkeypatch.setattr(attention, "available_backends", lambda device: ["torch_varlen", "sdpa"])
    assert resolve_attn_backend("auto", "cuda") == "torch_varlen"
    monkeypatch.setattr(attention, "available_backends", lambda device: ["flash_attn", "torch_varlen", "sdpa"])
    assert resolve_attn_backend("auto", "cuda") == "flash_attn"
    assert resolve_attn_backend("auto", "cuda", packing=True) == "flash_attn"


def test_right_padded_batch_runs_without_a_mask_and_gives_the_same_result(setup):
    """llm_attention_mask drops the padding mask of a right-padded batch (causal attention alone
    keeps real tokens off the pads): the same hidden states, loss and LoRA gradients."""
    model, tokenizer, examples = setup
    batch = collate(examples, tokenizer.pad_token_id)
    mask = batch["attention_mask"]
    assert (mask == 0).any(), "the batch must have padding"
    assert llm_attention_mask(mask, "sdpa") is None
    assert llm_attention_mask(mask, "eager") is mask and llm_attention_mask(None, "sdpa") is None
    left_padded = mask.flip(1)
    assert llm_attention_mask(left_padded, "sdpa") is left_padded
    real = mask.bool()
    results = []
    for given in (mask, None):
        model.zero_grad()
        embeds = model.embed(batch["input_ids"], model.encode_audio(batch["input_features"], batch["feature_attention_mask"]))
        hidden = model.llm(inputs_embeds=embeds, attention_mask=given, position_ids=text_position_ids(mask),
                           use_cache=False).last_hidden_state
        logits = model.lm_head(hidden).float()
        loss = sum(sample_loss(logits[i], batch["labels"][i]) for i in range(len(examples)))
        loss.backward()
        results.append((hidden[real].detach(), loss.detach(), lora_grads(model)))
    (h_mask, loss_mask, g_mask), (h_none, loss_none, g_none) = results
    assert_close(h_none, h_mask, "hidden states of real tokens")
    assert_close(loss_none, loss_mask, "loss")
    for name in g_mask:
        assert g_mask[name].abs().max() > 0, name
        assert_close(g_none[name], g_mask[name], f"gradient of {name}")


# --- Liger ------------------------------------------------------------------------------------
@triton.jit
def interpreted_rsqrt(x):
    return tl.rsqrt(x)


@pytest.fixture
def liger_under_interpreter(monkeypatch):
    """Two gaps of Triton 3.9's interpreter that Liger's kernels hit, bridged as the compiler does:
    float kernel arguments arrive as Python floats (no .to()), and libdevice's rsqrt is missing."""
    if torch.cuda.is_available():
        return
    import triton.runtime.interpreter as interpreter

    convert = interpreter._implicit_cvt

    def float_as_fp32(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    import liger_kernel.ops.rms_norm as liger_rms_norm

    monkeypatch.setattr(interpreter, "_implicit_cvt", float_as_fp32)
    monkeypatch.setattr(liger_rms_norm, "rsqrt", interpreted_rsqrt)


def test_liger_patched_llm_matches_the_unpatched_one(liger_under_interpreter):
    plain, tokenizer = build(seed=3)
    patched, _ = build(seed=3)
    assert apply_liger(patched.llm) == ["rms_norm", "swiglu", "mrope"]
    layer = patched.llm.layers[0]
    assert type(layer.mlp).__name__ == "LigerSwiGLU" and type(layer.mlp.gate_proj).__name__ == "LoRALinear"
    assert {n for n, _ in plain.named_parameters()} == {n for n, _ in patched.named_parameters()}
    examples = short_examples(tokenizer)
    want = run_packed(plain, tokenizer, examples)
    got = run_packed(patched, tokenizer, examples)
    for i, (g, w) in enumerate(zip(got[0], want[0])):
        assert_close(g, w, f"liger: logits of sample {i}")
    assert_close(torch.stack(got[1]), torch.stack(want[1]), "liger: losses")
    for name in want[2]:
        assert_close(got[2][name], want[2][name], f"liger: gradient of {name}")


def test_short_packed_training_run_lowers_the_loss():
    """LoRA training on packed rows, loss as the engine computes it (fused linear + CE over the
    target rows, per-task sums from token_task_ids)."""
    from kernels.linear_cross_entropy import linear_cross_entropy
    from loaders.packing import pack_examples

    model, tokenizer = build(seed=1)
    examples = examples_of(make_batch(tokenizer, seed=21, batch_size=4))
    rows = [collate_packed(r, tokenizer.pad_token_id) for r in pack_examples(examples, 160)]
    assert len(rows) > 1 and sum(len(r["keys"]) for r in rows) == len(examples)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(8):
        total, count = 0.0, 0
        optimizer.zero_grad()
        for row in rows:
            hidden = packed_hidden_states(model, row)
            labels = row["labels"][:, 1:]
            valid = labels != IGNORE_INDEX
            task_ids = row["token_task_ids"][:, 1:][valid]
            loss_sum, n_valid, per_task = linear_cross_entropy(hidden[:, :-1][valid], model.lm_head.weight, labels[valid],
                                                               task_ids=task_ids, num_tasks=len(TASKS), impl="reference")
            assert torch.allclose(per_task.sum(), loss_sum, rtol=1e-5)
            loss_sum.backward()
            total, count = total + float(loss_sum), count + int(n_valid)
        optimizer.step()
        losses.append(total / count)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # seeded: 6.05 -> 2.56 measured
    assert losses[-1] < 0.9 * losses[0], losses



# --- GPU (the tiny preset in bf16, model.dtype=auto on CUDA), run by profiling/gpu_check.sh ----------
# bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); four layers of the tiny model stay
# within a few steps, so a relative error of 5e-2 on logits and gradients leaves margin.
BF16_RTOL = 5e-2


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
    assert err < BF16_RTOL, f"{what}: relative error {err:.3g} >= {BF16_RTOL}"


def compare_on_gpu(model, tokenizer, examples, want, what):
    assert model.lm_head.weight.dtype == torch.bfloat16
    got = run_packed(model, tokenizer, examples)
    for i, (g, w) in enumerate(zip(got[0], want[0])):
        assert_close_rel(g, w, f"{what}: logits of sample {i}")
    assert_close_rel(torch.stack(got[1]), torch.stack(want[1]), f"{what}: losses")
    for name in want[2]:
        assert_close_rel(got[2][name], want[2][name], f"{what}: gradient of {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch_varlen", "flash_attn"])
def test_gpu_varlen_backends_on_a_packed_row_equal_each_sample_alone(backend):
    from engine.attention import available_backends, set_attn_backend

    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not available here: {available_backends('cuda')}")
    model, tokenizer = build(device="cuda")
    examples = examples_of(make_batch(tokenizer, seed=11, batch_size=4))
    want = run_alone(model, tokenizer, examples)  # sdpa, each sample alone
    set_attn_backend(model.thinker, backend)
    compare_on_gpu(model, tokenizer, examples, want, backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_liger_patched_llm_matches_the_unpatched_one():
    plain, tokenizer = build(seed=3, device="cuda")
    patched, _ = build(seed=3, device="cuda")
    apply_liger(patched.llm)
    examples = examples_of(make_batch(tokenizer, seed=5, batch_size=4))
    want = run_packed(plain, tokenizer, examples)
    compare_on_gpu(patched, tokenizer, examples, want, "liger")


def test_length_buckets_cover_every_sample_once_within_the_slack():
    lengths = [130, 7, 128, 400, 129, 1, 60, 125, 131, 399]
    buckets = attention.length_buckets(lengths, slack=1.25)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for bucket in buckets:
        longest = max(lengths[i] for i in bucket)
        assert lengths[bucket[0]] == longest
        assert len(bucket) * longest ** 2 <= 1.25 * sum(lengths[i] ** 2 for i in bucket)
    assert {3, 9} in [set(b) for b in buckets]                          # similar lengths share a call
    assert len(buckets) < len(lengths)


@pytest.mark.parametrize("causal", [True, False])
def test_bucketed_varlen_attention_equals_one_call_per_sample(causal):
    gen = torch.Generator().manual_seed(3)
    lengths = [37, 35, 36, 5, 1, 64, 60, 2]           # odd lengths; buckets of several samples and of one
    cu = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
    total, heads, kv_heads, dim = sum(lengths), 4, 2, 16
    q = torch.randn(total, heads, dim, generator=gen, requires_grad=True)
    k = torch.randn(total, kv_heads, dim, generator=gen, requires_grad=True)
    v = torch.randn(total, kv_heads, dim, generator=gen, requires_grad=True)
    window = (-1, 0) if causal else (-1, -1)
    args = (cu, cu, max(lengths), max(lengths))
    got = attention.bucketed_varlen_attn(q, k, v, *args, window_size=window, enable_gqa=True)
    want = reference_varlen_attn(q, k, v, *args, window_size=window, enable_gqa=True)
    assert len(attention.length_buckets(lengths)) < len(lengths)    # really batched
    torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=FP32_RTOL)
    upstream = torch.randn(got.shape, generator=gen)
    grads = torch.autograd.grad(got, (q, k, v), upstream)
    expected = torch.autograd.grad(want, (q, k, v), upstream)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=FP32_ATOL, rtol=FP32_RTOL)
