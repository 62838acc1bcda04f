"""Validation under torchrun: one standalone validation, then (with --train) a short curriculum
run through the engine's runner with the validation hooks attached. Rank 0 writes
OUT_DIR/result.json; the run folder is OUT_DIR/run.

    torchrun --nproc_per_node=W tests/engine/validation_worker.py OUT_DIR SHARD_DIR [--train]

SHARD_DIR holds train-00000{0,1}.tar and val-00000{0,1,2}.tar (three validation shards: two
ranks get unequal shares). The test compares the standalone validation of W=1 and W=2 and
checks the eval rows the hooks write during the run.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import engine.runner as runner  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.model import build_model  # noqa: E402
from engine.parallel import apply_parallelism, init_distributed  # noqa: E402
from engine.tokenizer import build_tiny_tokenizer  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from engine.validation import Validator  # noqa: E402
from synthetic_batches import randomize_lora_b  # noqa: E402

# tpc over 3 steps: stage [asr] at step 0, [asr, sum] from step 1, all tasks from step 2.
SETTINGS = ["max_steps=3", "eval.every=2", "eval.max_samples=10", "eval.max_new_tokens=8",
            "data.max_tokens_per_batch=1024", "lora.dropout=0", "lora.impl=reference", "loss.impl=reference",
            "optim.warmup_steps=0", "metrics.tensorboard=false", "metrics.progress_bar=false", "checkpoint.every=0"]


def run_config(out: Path, shards: str):
    return load_config("tpc", SETTINGS + [f"output_dir={out / 'run'}", f"data.train={shards}/train-{{000000..000001}}.tar",
                                          f"data.val={shards}/val-{{000000..000002}}.tar"])


def standalone_validation(cfg, env) -> dict:
    tokenizer = build_tiny_tokenizer()
    model = build_model(cfg.model, cfg.lora, cfg.loss, tokenizer, env.device)
    # LoRA B starts at zero; random values make the adapters part of what is validated.
    randomize_lora_b(model, std=0.05)
    apply_parallelism(model, gradient_checkpointing=False, compile=False, device=env.device)
    model.train()
    rng_before = torch.get_rng_state()
    validator = Validator(cfg, env, model, tokenizer)
    row = validator.run(step=0, tokens=0, stage="start")
    return {"world_size": env.world_size, "row": row, "records": validator.last_records,
            "rng_unchanged": bool(torch.equal(rng_before, torch.get_rng_state())),
            "examples_per_rank": validator.examples_per_rank, "training_mode_after": model.training}


def train_with_validation(cfg) -> list[int]:
    """runner.run_training (which attaches validation), with a hook registered before it that
    must keep running next to the validation hooks."""
    steps_seen = []

    class HookedTrainer(Trainer):
        def __init__(self, cfg, env, model, *args, **kwargs):
            super().__init__(cfg, env, model, *args, **kwargs)
            self.hooks["after_step"] = lambda t: steps_seen.append(t.state.step)

    runner.Trainer = HookedTrainer
    runner.run_training(cfg)  # ends with close_distributed()
    return steps_seen


def main() -> None:
    out, shards, train = Path(sys.argv[1]), sys.argv[2], "--train" in sys.argv[3:]
    env = init_distributed()
    result = standalone_validation(run_config(out, shards), env)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if train:
        result["steps_seen_by_earlier_hook"] = train_with_validation(run_config(out, shards))
    else:
        runner.close_distributed()
    if env.is_main:
        (out / "result.json").write_text(json.dumps(result, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
