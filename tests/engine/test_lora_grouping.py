"""Grouped LoRA in the model (`lora.grouped`): q/k/v from one lora_qkv call, gate/up/down from one
lora_mlp call, against per-projection LoRA in the tiny model.

Dropout: a grouped call draws one seed per group (q, k, v share one mask over their input; gate
and up share one; down takes one derived from it: kernels/lora_grouped.py), while per-projection LoRA
draws one seed per projection. With dropout on the two differ by construction, so they are
compared with dropout 0; with dropout on, the seeds the grouped path draws are checked against
that definition, and activation checkpointing must replay them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import lora as engine_lora
from engine.config import LoRAConfig, LossConfig, ModelConfig
from engine.lora import GroupedLoRAMLP, peft_state_dict
from engine.model import build_model
from engine.tokenizer import build_tiny_tokenizer
from kernels import lora as kernels_lora
from kernels import lora_grouped as kernels_lora_grouped
from kernels.lora_grouped import _down_seed
from loaders.packing import collate_packed
from loaders.stream import Example
from synthetic_batches import make_batch, randomize_lora_b

CPU = torch.device("cpu")
TINY_LAYERS = 4  # engine/model.py TINY_SHAPES
# fp32, same math in another grouping of the same matmuls: measured equal to ~1e-7.
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def build(tokenizer, grouped, dropout=0.0, impl="torch", targets=None):
    lcfg = LoRAConfig(dropout=dropout, impl=impl, grouped=grouped)
    if targets is not None:
        lcfg.targets = targets
    model = build_model(ModelConfig(), lcfg, LossConfig(impl="reference"), tokenizer, CPU)
    randomize_lora_b(model, std=0.05)  # B = 0 at init would hide the adapter path
    return model.train()


def train_steps(model, batches, seed=123):
    """Losses of len(batches) SGD steps, and the LoRA gradients of the last one."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(seed)  # the dropout seeds drawn in forward
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        out = model(batch)
        loss = out["loss_sum"] / out["n_valid"]
        loss.backward()
        losses.append(loss.item())
        grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
                 for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
    return losses, grads


@pytest.fixture
def call_counts(monkeypatch):
    """How often the model calls the grouped and the per-projection LoRA functions."""
    counts = {"lora_qkv": 0, "lora_mlp": 0, "lora_linear": 0}

    def counting(name):
        real = getattr(engine_lora, name)

        def call(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return call

    for name in counts:
        monkeypatch.setattr(engine_lora, name, counting(name))
    return counts


def assert_same_training(got, want, what):
    (losses_got, grads_got), (losses_want, grads_want) = got, want
    np.testing.assert_allclose(losses_got, losses_want, rtol=RTOL, err_msg=f"{what}: losses")
    assert set(grads_got) == set(grads_want)
    for name in grads_want:
        assert grads_want[name].abs().max() > 0, f"{name}: no gradient reached this adapter"
        torch.testing.assert_close(grads_got[name], grads_want[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def test_grouped_trains_like_per_projection_lora_and_takes_the_grouped_path(tokenizer, call_counts):
    batches = [make_batch(tokenizer, seed=s) for s in (1, 2, 3)]
    per_projection = build(tokenizer, grouped=False)
    assert per_projection.lora_grouping == {"qkv": 0, "mlp": 0}
    want = train_steps(per_projection, batches)
    assert call_counts == {"lora_qkv": 0, "lora_mlp": 0, "lora_linear": 3 * 7 * TINY_LAYERS}

    call_counts.update(lora_qkv=0, lora_mlp=0, lora_linear=0)
    grouped = build(tokenizer, grouped="auto")
    assert grouped.lora_grouping == {"qkv": TINY_LAYERS, "mlp": TINY_LAYERS}
    got = train_steps(grouped, batches)
    # per step and layer: one lora_qkv, one lora_mlp, and o_proj on its own
    assert call_counts == {"lora_qkv": 3 * TINY_LAYERS, "lora_mlp": 3 * TINY_LAYERS, "lora_linear": 3 * TINY_LAYERS}
    assert_same_training(got, want, "grouped vs per-projection")
    assert got[0][-1] < got[0][0], "three SGD steps on the same data did not lower the loss"


def test_parameter_names_and_exported_adapter_keys_do_not_change(tokenizer):
    plain, grouped = build(tokenizer, grouped=False), build(tokenizer, grouped=True)
    assert isinstance(grouped.llm.layers[0].mlp, GroupedLoRAMLP)
    names = [n for n, _ in plain.named_parameters()]
    assert names == [n for n, _ in grouped.named_parameters()]
    lora = lambda m: {n: p for n, p in m.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    keys = set(peft_state_dict(lora(grouped), "thinker."))
    assert keys == set(peft_state_dict(lora(plain), "thinker."))
    llm = plain.parts.llm_path     # model.language_model (transformers >= 5.2x) or model (flat layout)
    assert f"base_model.model.{llm}.layers.0.mlp.gate_proj.lora_A.weight" in keys
    assert f"base_model.model.{llm}.layers.3.self_attn.v_proj.lora_B.weight" in keys


def test_partial_targets_fall_back_to_per_projection_lora_and_train(tokenizer, call_counts):
    batches = [make_batch(tokenizer, seed=s) for s in (4, 4)]
    model = build(tokenizer, grouped="auto", targets=["q_proj", "v_proj", "gate_proj", "up_proj"])
    assert model.lora_grouping == {"qkv": 0, "mlp": 0}
    assert not any(isinstance(layer.mlp, GroupedLoRAMLP) for layer in model.llm.layers)
    losses, grads = train_steps(model, batches)
    assert call_counts["lora_qkv"] == call_counts["lora_mlp"] == 0
    assert call_counts["lora_linear"] == 2 * 4 * TINY_LAYERS
    assert len(grads) == 4 * 2 * TINY_LAYERS and all(g.abs().max() > 0 for g in grads.values())
    assert losses[1] < losses[0]
    # attention fully targeted, MLP not: q/k/v grouped, the MLP stays transformers' own
    mixed = build(tokenizer, grouped="auto", targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert mixed.lora_grouping == {"qkv": TINY_LAYERS, "mlp": 0}


def test_grouped_true_without_a_possible_group_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="lora.grouped=true"):
        build(tokenizer, grouped=True, targets=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="lora.grouped="):
        build(tokenizer, grouped="sometimes")


def test_dropout_seeds_follow_the_grouped_kernels_definition(tokenizer, monkeypatch):
    """Per forward and layer: one seed and one dropped input shared by q, k, v; one by gate and
    up; down's derived from it (kernels/lora_grouped.py _down_seed); o_proj its own. The masks
    keep ~1 - p of the inputs."""
    p = 0.3
    calls = []
    real = kernels_lora._reference_dropout

    def spy(x2d, dropout_p, seed, keep_mask=None, rng="philox"):
        out = real(x2d, dropout_p, seed, keep_mask, rng)
        calls.append((seed, tuple(x2d.shape), ((out != 0) | (x2d == 0)).float().mean().item()))
        return out

    monkeypatch.setattr(kernels_lora, "_reference_dropout", spy)
    monkeypatch.setattr(kernels_lora_grouped, "_reference_dropout", spy)
    model = build(tokenizer, grouped=True, dropout=p)
    torch.manual_seed(0)
    batch = make_batch(tokenizer, seed=6)
    model(batch)
    hidden = model.llm.config.hidden_size
    # the last layer's o_proj and MLP run on the loss's rows only (engine/target_rows.py)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    per_layer = 4   # q/k/v (one dropped input), o, gate/up (one), down
    assert len(calls) == per_layer * TINY_LAYERS
    for layer in range(TINY_LAYERS):
        qkv, o, gate_up, down = calls[per_layer * layer:per_layer * (layer + 1)]
        assert down[0] == _down_seed(gate_up[0])
        assert len({qkv[0], o[0], gate_up[0]}) == 3
        rows = targets if layer == TINY_LAYERS - 1 else batch["input_ids"].numel()
        assert qkv[1] == (batch["input_ids"].numel(), hidden) and gate_up[1] == o[1] == (rows, hidden)
        assert down[1] == (rows, model.llm.config.intermediate_size)
    assert len({c[0] for c in calls[::per_layer]}) == TINY_LAYERS, "every layer draws its own seed"
    kept = np.mean([c[2] for c in calls])
    assert abs(kept - (1 - p)) < 0.02, f"grouped dropout kept {kept:.3f} of the inputs, expected {1 - p}"


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs the Triton interpreter or a GPU"))])
def test_activation_checkpointing_replays_the_grouped_dropout(tokenizer, impl):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    batch = make_batch(tokenizer, seed=7, batch_size=1)
    plain = train_steps(build(tokenizer, grouped=True, dropout=0.2, impl=impl), [batch])
    model = build(tokenizer, grouped=True, dropout=0.2, impl=impl)
    layers = model.llm.layers
    for i, layer in enumerate(list(layers)):
        layers[i] = checkpoint_wrapper(layer, preserve_rng_state=True)
    assert_same_training(train_steps(model, [batch]), plain, f"checkpointed vs plain ({impl})")
    other_seed = train_steps(build(tokenizer, grouped=True, dropout=0.2, impl=impl), [batch], seed=124)
    assert other_seed[0] != plain[0], "the dropout seed must change the loss"


def packed_batch(tokenizer, seeds):
    examples = []
    for seed in seeds:
        b = make_batch(tokenizer, seed=seed, batch_size=1)
        n, frames = int(b["attention_mask"].sum()), int(b["feature_attention_mask"].sum())
        examples.append(Example(key=b["keys"][0], shard="synthetic", task=b["tasks"][0], label=None, epoch=0,
                                input_ids=b["input_ids"][0, :n].numpy(), labels=b["labels"][0, :n].numpy(),
                                features=b["input_features"][0, :, :frames].numpy(), audio_seconds=frames / 100))
    return collate_packed(examples, tokenizer.pad_token_id)


def test_packed_rows_grouped_equal_per_projection(tokenizer, call_counts):
    batches = [packed_batch(tokenizer, (8, 9, 10))] * 2
    want = train_steps(build(tokenizer, grouped=False), batches)
    call_counts.update(lora_qkv=0)
    got = train_steps(build(tokenizer, grouped=True), batches)
    assert call_counts["lora_qkv"] == 2 * TINY_LAYERS
    assert_same_training(got, want, "packed, grouped vs per-projection")



def test_fsdp2_with_activation_checkpointing_grouped_equals_per_projection(tmp_path):
    """torchrun, 2 ranks on gloo, fully_shard per block, activation checkpointing per layer."""
    out = tmp_path / "fsdp.json"
    worker = Path(__file__).with_name("lora_grouping_fsdp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(out), "2"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    grouped, plain = result["grouped"], result["per_projection"]
    assert grouped["grouping"] == {"qkv": TINY_LAYERS, "mlp": TINY_LAYERS} and plain["grouping"] == {"qkv": 0, "mlp": 0}
    assert grouped["sharded"] and plain["sharded"], "fully_shard was not applied to the root and every decoder layer"
    np.testing.assert_allclose(grouped["losses"], plain["losses"], rtol=RTOL)
    assert set(grouped["grads"]) == set(plain["grads"]) and len(plain["grads"]) == 14 * TINY_LAYERS
    for name, want in plain["grads"].items():
        assert max(map(abs, want)) > 0, f"{name}: no gradient"
        np.testing.assert_allclose(grouped["grads"][name], want, rtol=RTOL, atol=ATOL, err_msg=name)
