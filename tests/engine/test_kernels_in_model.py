"""Inside the tiny model, the Triton LoRA kernels (interpreted on CPU) and their reference give the
same loss and the same LoRA gradients, with dropout on (the kernels' mask is reproduced by the
reference bit for bit): per projection (lora_linear), and grouped (lora_qkv, lora_mlp, and
lora_linear for o_proj)."""
import pytest
import torch

from engine.config import LoRAConfig, LossConfig, ModelConfig
from engine.model import build_model
from engine.tokenizer import build_tiny_tokenizer
from synthetic_batches import make_batch


def loss_and_grads(impl: str, grouped: bool, batch: dict, tokenizer):
    torch.manual_seed(0)
    model = build_model(ModelConfig(), LoRAConfig(impl=impl, dropout=0.1, grouped=grouped), LossConfig(impl="reference"),
                        tokenizer, torch.device("cpu"))
    assert model.lora_grouping == ({"qkv": 4, "mlp": 4} if grouped else {"qkv": 0, "mlp": 0})
    with torch.no_grad():  # B = 0 at init would hide errors in the adapter path
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    model.train()
    torch.manual_seed(123)  # the dropout seeds drawn in forward
    out = model(batch)
    loss = out["loss_sum"] / out["n_valid"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-projection"])
def test_triton_and_reference_lora_agree_in_the_tiny_model(grouped):
    tokenizer = build_tiny_tokenizer()
    batch = make_batch(tokenizer, seed=5, batch_size=1)
    loss_ref, grads_ref = loss_and_grads("reference", grouped, batch, tokenizer)
    loss_tri, grads_tri = loss_and_grads("triton", grouped, batch, tokenizer)
    assert loss_tri == pytest.approx(loss_ref, rel=1e-5)
    assert set(grads_ref) == set(grads_tri) and len(grads_ref) == 56
    for name in grads_ref:
        torch.testing.assert_close(grads_tri[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
