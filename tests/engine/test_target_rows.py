"""`model.last_layer_on_targets`: the last layer's o_proj and MLP on the loss's rows only give the
same losses, per-task sums, LoRA gradients and predictions as running them on every row."""
import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from engine.config import LoRAConfig, LossConfig, ModelConfig
from engine.model import build_model
from engine.target_rows import target_rows
from engine.tokenizer import build_tiny_tokenizer
from synthetic_batches import make_batch, randomize_lora_b
from test_lora_grouping import packed_batch

CPU = torch.device("cpu")
# fp32, the same matmuls on a subset of rows: measured equal to ~1e-7.
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def build(tokenizer, on_targets, grouped="auto"):
    mcfg = ModelConfig(last_layer_on_targets=on_targets)
    model = build_model(mcfg, LoRAConfig(dropout=0.0, impl="torch", grouped=grouped), LossConfig(impl="reference"),
                        tokenizer, CPU)
    randomize_lora_b(model, std=0.05)  # B = 0 would hide the adapter path
    return model.train()


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    (out["loss_sum"] / out["n_valid"]).backward()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_same(got, want):
    (out_got, grads_got), (out_want, grads_want) = got, want
    torch.testing.assert_close(out_got["loss_sum"], out_want["loss_sum"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out_got["per_task_loss_sum"], out_want["per_task_loss_sum"], rtol=RTOL, atol=ATOL)
    assert int(out_got["n_valid"]) == int(out_want["n_valid"]) > 0
    assert set(grads_got) == set(grads_want)
    for name, want in grads_want.items():
        assert want.abs().max() > 0, f"{name}: no gradient"
        torch.testing.assert_close(grads_got[name], want, rtol=RTOL, atol=ATOL, msg=name)


def test_target_rows_are_the_rows_the_loss_reads():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    valid = labels[:, 1:] != -100
    rows = target_rows(valid)
    assert rows.tolist() == [1, 2, 5]  # row t predicts token t + 1; flat index b * T + t
    hidden = torch.randn(2, 5, 3)
    assert torch.equal(hidden.reshape(10, 3)[rows], hidden[:, :-1][valid])


@pytest.mark.parametrize("grouped", ["auto", "false"])
def test_padded_batch_equals_every_row(tokenizer, grouped):
    batch = make_batch(tokenizer, seed=5, batch_size=3)
    full = build(tokenizer, on_targets=False, grouped=grouped)
    sub = build(tokenizer, on_targets=True, grouped=grouped)
    assert_same(loss_and_grads(sub, batch), loss_and_grads(full, batch))


def test_packed_batch_equals_every_row(tokenizer):
    batch = packed_batch(tokenizer, (8, 9, 10))
    assert_same(loss_and_grads(build(tokenizer, True), batch), loss_and_grads(build(tokenizer, False), batch))


def test_activation_checkpointing_recomputes_the_same_rows(tokenizer):
    """Backward recomputes the checkpointed last layer: the hooks must select the same rows again."""
    batch = make_batch(tokenizer, seed=6, batch_size=2)
    want = loss_and_grads(build(tokenizer, False), batch)
    model = build(tokenizer, True)
    layers = model.llm.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)
    assert_same(loss_and_grads(model, batch), want)


def test_eval_predictions_and_decoding_logits_are_unchanged(tokenizer):
    batch = make_batch(tokenizer, seed=7, batch_size=3)
    full, sub = build(tokenizer, False).eval(), build(tokenizer, True).eval()
    with torch.no_grad():
        want, got = full(batch, mode="eval"), sub(batch, mode="eval")
        torch.testing.assert_close(got["loss_sum"], want["loss_sum"], rtol=RTOL, atol=ATOL)
        assert torch.equal(got["first_pred"], want["first_pred"])
        # decoding reads the last real row, not a target row: every row runs there
        torch.testing.assert_close(sub(batch, mode="next_token_logits"), full(batch, mode="next_token_logits"),
                                   rtol=RTOL, atol=ATOL)
        assert sub.last_layer_rows.rows is None


def test_the_last_layer_really_runs_on_fewer_rows(tokenizer):
    batch = make_batch(tokenizer, seed=8, batch_size=2)
    model = build(tokenizer, True)
    seen = []
    model.llm.layers[-1].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    model(batch)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert seen == [n_targets] and n_targets < batch["input_ids"].numel()
