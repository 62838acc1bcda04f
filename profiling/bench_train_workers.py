"""What profiling/bench_train.py measures, one variant per process: ours (the engine) or the HF baseline.

    python -m profiling.bench_train --worker ours|ours_packed|baseline --spec RUN_DIR/spec.json

The parent writes the spec (recipe, overrides, run folder, which batch file each variant replays)
and the batches; a worker builds its model, trains on its rank's share of the batches, and writes
RUN_DIR/<variant>-rank<r>.json: wall time and real tokens per optimizer step, the loss of step 1,
and the memory report taken before the end-of-run checkpoint.
  ours, ours_packed  engine.model.build_model + engine.parallel.apply_parallelism + engine.trainer.Trainer
                     over a ReplayStream of the padded (ours) or packed (ours_packed) micro-batches
  baseline           transformers.Trainer + peft.get_peft_model on the padded micro-batches
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from profiling.bench_batches import rank_share
from profiling.memory_report import format_memory_report, memory_report

WORKER_VARIANTS = ("ours", "ours_packed", "baseline")


# ----------------------------------------------------------------------------- timing
class StepClock:
    """Wall time per optimizer step (CUDA synchronized) and real tokens the model consumed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.step_s: list[float] = []
        self.step_tokens: list[int] = []
        self._pending = []
        self._t = None

    def start(self) -> None:
        self._sync()
        self._t = time.perf_counter()

    def count(self, attention_mask: torch.Tensor) -> None:
        self._pending.append(attention_mask.sum())  # summed lazily: no device sync mid-step

    def lap(self) -> None:
        self._sync()
        now = time.perf_counter()
        self.step_s.append(now - self._t)
        self.step_tokens.append(int(sum(int(t) for t in self._pending)))
        self._pending = []
        self._t = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def worker_result(variant: str, clock: StepClock, first_loss, memory: dict, device: torch.device, rank: int,
                  world_size: int, extra: dict) -> dict:
    from engine.metrics import device_peak_flops
    from engine.trainer import device_name

    return {"variant": variant, "rank": rank, "world_size": world_size, "device": device_name(device),
            "peak_flops": device_peak_flops(device), "step_s": clock.step_s, "step_tokens": clock.step_tokens,
            "first_loss": first_loss, "memory": memory, **extra}


# ----------------------------------------------------------------------------- ours
class ReplayStream:
    """The trainer's stream protocol over a fixed list of steps."""

    def __init__(self, steps: list[list[dict]]):
        self.steps, self.position = steps, 0

    def next_step(self) -> list[dict]:
        step = self.steps[self.position]
        self.position += 1
        return step

    def set_tasks(self, tasks, weights=None) -> None:
        pass

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def run_ours(spec: dict, steps: list[list[dict]], out_dir: Path, variant: str = "ours") -> dict:
    """The engine's Trainer over a ReplayStream of `steps`: padded micro-batches (ours) or packed
    rows (ours_packed, with the spec's extra overrides for it: data.packing=true)."""
    from engine.config import load_config
    from engine.model import build_model
    from engine.parallel import apply_parallelism, close_distributed, init_distributed
    from engine.runner import resolve_impls
    from engine.tokenizer import build_tiny_tokenizer
    from engine.trainer import Trainer

    env = init_distributed()
    try:
        cfg = load_config(spec["recipe"], spec["overrides"] + spec.get("variant_overrides", {}).get(variant, []) + [
            f"output_dir={out_dir}", "metrics.tensorboard=false", "metrics.progress_bar=false",
            f"metrics.log_every={len(steps)}", "checkpoint.every=0", "checkpoint.resume=never"])
        resolve_impls(cfg, env)
        model = build_model(cfg.model, cfg.lora, cfg.loss, build_tiny_tokenizer(), env.device)
        apply_parallelism(model, gradient_checkpointing=cfg.model.gradient_checkpointing, compile=cfg.model.compile,
                          device=env.device, fsdp=cfg.model.fsdp)
        torch.manual_seed(cfg.seed + 1000 * env.rank)
        out_dir.mkdir(parents=True, exist_ok=True)
        clock, found = StepClock(env.device), {}
        model.register_forward_pre_hook(lambda module, args: clock.count(args[0]["attention_mask"]))

        def after_step(trainer) -> None:
            clock.lap()
            if trainer.state.step == 1:
                found["first_loss"] = trainer.last_stats.loss
            if trainer.state.step == len(steps):  # before the end-of-run checkpoint
                found["memory"] = memory_report(trainer.model, trainer.optimizer, env.device)

        stream = ReplayStream(rank_share(steps, env.rank, env.world_size))
        trainer = Trainer(cfg, env, model, stream, None, out_dir, hooks={"after_step": after_step})
        clock.start()
        trainer.train()
        trainer.close()
        extra = {"lora_impl": cfg.lora.impl, "loss_impl": cfg.loss.impl, "optimizer": "torch.optim.AdamW",
                 "attn_backend": cfg.model.attn_backend}
        return worker_result(variant, clock, found.get("first_loss"), found["memory"], env.device, env.rank,
                             env.world_size, extra)
    finally:
        close_distributed()


# ----------------------------------------------------------------------------- baseline
def run_baseline(spec: dict, steps: list[list[dict]], out_dir: Path) -> dict:
    """transformers.Trainer + PEFT on the padded micro-batches, one per Trainer item, as a user feeds
    it: Trainer has no padding-free path for Omni (DataCollatorWithFlattening needs flash-attention
    and gives no 4-row M-RoPE position ids or per-sample audio features)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from engine.config import load_config
    from engine.lora import lora_target_regex
    from engine.model import build_thinker, locate_parts
    from engine.tokenizer import build_tiny_tokenizer

    cfg = load_config(spec["recipe"], spec["overrides"])
    on_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if on_cuda else torch.float32  # the user's torch_dtype=bfloat16 on GPU
    thinker = build_thinker(cfg.model, build_tiny_tokenizer(), device=device, dtype=dtype, attn_impl="sdpa")
    thinker.config.use_cache = False
    pattern = lora_target_regex(locate_parts(thinker).llm_path + ".layers", cfg.lora.targets)
    model = get_peft_model(thinker, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                               lora_dropout=cfg.lora.dropout, target_modules=pattern))
    clock, found = StepClock(device), {}
    thinker.register_forward_pre_hook(lambda m, args, kwargs: clock.count(kwargs["attention_mask"]), with_kwargs=True)
    n_steps = len(steps)

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.lap()
            if state.global_step == n_steps:
                found["memory"] = memory_report(kw["model"], kw["optimizer"], device)

        def on_log(self, args, state, control, logs=None, **kw):
            if state.global_step == 1 and logs and "loss" in logs:
                found["first_loss"] = float(logs["loss"])

    flat = [mb for step in steps for mb in step]  # accelerate deals item i to rank i % world_size
    model_keys = ("input_ids", "attention_mask", "labels", "input_features", "feature_attention_mask")

    def collate(items: list[dict]) -> dict:
        (batch,) = items
        out = {k: batch[k] for k in model_keys}
        out["input_features"] = out["input_features"].to(dtype)  # as a processor's output .to(model.dtype)
        return out

    o = cfg.optim
    world = int(os.environ.get("WORLD_SIZE", 1))
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=1, gradient_accumulation_steps=o.grad_accum,
        max_steps=n_steps, learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
        adam_beta2=o.betas[1], max_grad_norm=o.grad_clip if o.grad_clip > 0 else 0.0, warmup_steps=o.warmup_steps,
        lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        bf16=on_cuda, use_cpu=not on_cuda, dataloader_num_workers=0, remove_unused_columns=False,
        train_sampling_strategy="sequential", seed=cfg.seed,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, ddp_backend="gloo" if world > 1 and not on_cuda else None)
    trainer = Trainer(model=model, args=args, train_dataset=flat, data_collator=collate, callbacks=[Timing()])
    trainer.train()
    extra = {"optimizer": args.optim if isinstance(args.optim, str) else args.optim.value}
    return worker_result("baseline", clock, found.get("first_loss"), found["memory"], device,
                         int(os.environ.get("RANK", 0)), world, extra)


def worker_main(variant: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec["run_dir"])
    # A spec without "batches" (written before packed runs existed) replays batches.pt.
    steps = torch.load(run_dir / spec.get("batches", {}).get(variant, "batches.pt"), weights_only=True)
    if variant == "baseline":
        result = run_baseline(spec, steps, run_dir / variant)
    else:
        result = run_ours(spec, steps, run_dir / variant, variant)
    (run_dir / f"{variant}-rank{result['rank']}.json").write_text(json.dumps(result, indent=1))
    if result["rank"] == 0:
        print(format_memory_report(result["memory"], f"memory of {variant}"), flush=True)
    return 0
