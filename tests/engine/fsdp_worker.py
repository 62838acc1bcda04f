"""Run N steps on fixed synthetic data under torchrun and write losses and gradient norms.

    torchrun --nproc_per_node=W tests/engine/fsdp_worker.py OUT_DIR GLOBAL_MICRO STEPS

With GLOBAL_MICRO micro-batches per step shared among W ranks (GLOBAL_MICRO / W each,
accumulated), every world size sees the same global batch, so losses and gradient norms
must agree across world sizes.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine.config import load_config  # noqa: E402
from engine.model import build_model  # noqa: E402
from engine.parallel import apply_parallelism, close_distributed, init_distributed  # noqa: E402
from engine.tokenizer import build_tiny_tokenizer  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from synthetic_batches import FixedStream, randomize_lora_b  # noqa: E402


def main() -> None:
    out, global_micro, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    env = init_distributed()
    cfg = load_config("random", [f"output_dir={out}", f"max_steps={steps}", "lora.dropout=0", "optim.warmup_steps=0",
                                 f"optim.grad_accum={global_micro // env.world_size}", "loss.impl=reference",
                                 "lora.impl=reference", "metrics.tensorboard=false", "metrics.progress_bar=false",
                                 "checkpoint.every=0"])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    model = build_model(cfg.model, cfg.lora, cfg.loss, tokenizer, env.device)
    # LoRA B starts at zero; give it values so the first step's gradients reach A too.
    randomize_lora_b(model, std=0.02)
    apply_parallelism(model, gradient_checkpointing=False, compile=False, device=env.device)
    stream = FixedStream(tokenizer, rank=env.rank, world_size=env.world_size, global_micro=global_micro)
    rows = []
    trainer = Trainer(cfg, env, model, stream, None, out,
                      hooks={"after_step": lambda t: rows.append({"loss": t.last_stats.loss, "grad_norm": t.last_stats.grad_norm})})
    trainer.train()
    trainer.close()
    if env.is_main:
        (out / "steps.json").write_text(json.dumps(rows))
    close_distributed()


if __name__ == "__main__":
    main()
