"""Grouped and per-projection LoRA under FSDP2 with activation checkpointing, same data and init.

    torchrun --nproc_per_node=2 tests/engine/lora_grouping_fsdp_worker.py OUT.json STEPS

Each rank trains both variants for STEPS SGD steps on its own synthetic batches (dropout 0) and
rank 0 writes {variant: {"losses": [...], "grads": {name: [...]}}} with the full gradients of the
last step, for tests/engine/test_lora_grouping.py to compare.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402

from engine.config import LoRAConfig, LossConfig, ModelConfig  # noqa: E402
from engine.model import build_model  # noqa: E402
from engine.parallel import apply_parallelism, close_distributed, init_distributed  # noqa: E402
from engine.tokenizer import build_tiny_tokenizer  # noqa: E402
from synthetic_batches import make_batch, randomize_lora_b  # noqa: E402


def train(grouped: bool, env, tokenizer, steps: int) -> dict:
    model = build_model(ModelConfig(), LoRAConfig(dropout=0.0, impl="torch", grouped=grouped),
                        LossConfig(impl="reference"), tokenizer, env.device)
    randomize_lora_b(model, std=0.05)
    apply_parallelism(model, gradient_checkpointing=True, compile=False, device=env.device)
    sharded = all(isinstance(m, FSDPModule) for m in (model, *model.llm.layers))
    model.train()
    params = {n.replace("._checkpoint_wrapped_module", ""): p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(list(params.values()), lr=0.5)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        out = model(make_batch(tokenizer, seed=100 * step + env.rank))
        n_valid = out["n_valid"].detach().float()
        dist.all_reduce(n_valid)
        loss = out["loss_sum"] / n_valid
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item())
        optimizer.step()
    grads = {n: p.grad.full_tensor().flatten()[:64].tolist() for n, p in params.items()}
    return {"losses": losses, "grads": grads, "grouping": model.lora_grouping, "sharded": sharded}


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    env = init_distributed()
    tokenizer = build_tiny_tokenizer()
    result = {name: train(grouped, env, tokenizer, steps) for name, grouped in (("per_projection", False), ("grouped", True))}
    if env.is_main:
        out.write_text(json.dumps(result))
    close_distributed()


if __name__ == "__main__":
    main()
