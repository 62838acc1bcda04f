"""The training loop: gradient accumulation, global token normalization, guards, logging.

One optimizer step:
  1. take this rank's micro-batches for the step from the stream (timed as data wait);
  2. count target tokens on every rank and all-reduce: the loss of each micro-batch is its
     summed token loss / the global count, so every token weighs the same whatever the
     batch split, the number of micro-batches or the world size;
  3. forward + backward per micro-batch; gradients are reduced across ranks only on the
     last one (`set_gradient_sync`; nothing to reduce for a single process);
  4. clip, then skip the update (and count it) if the loss or gradient norm is not finite;
  5. AdamW (fused kernel) over the LoRA weights, warmup + cosine schedule.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import record_function

from engine import checkpoint as ckpt
from engine.config import RunConfig
from engine.metrics import (LogWindow, MetricsWriter, batch_flops_inputs, device_peak_flops, flops_model_of,
                            format_line, peak_memory_gib)
from engine.parallel import DistEnv, all_reduce_sum, set_gradient_sync
from engine.stopping import stop_on_signals
from loaders.packing import token_slots
from loaders.rank_counts import gather_rank_counts
from loaders.tasks import TASKS


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why."""


def lr_lambda(step: int, warmup: int, progress: float, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine decay to min_ratio at progress 1."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# Devices with torch's fused AdamW kernel (one kernel over all parameters, no per-tensor Python
# loop): what transformers.Trainer picks by default since torch 2.8 (adamw_torch_fused).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def adamw_kernel(device: torch.device) -> dict:
    """torch.optim.AdamW's implementation flag for `device`: fused where torch has it, else foreach.
    On the tiny preset on CPU the single-tensor loop cost ~12 ms a step (56 LoRA tensors), fused ~1 ms."""
    return {"fused": True} if device.type in FUSED_ADAMW_DEVICES else {"foreach": True}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def target_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0  # real tokens seen, all ranks
    slots: int = 0  # token positions computed, all ranks (padding included)
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    stage_index: int = -1
    wall_s: float = 0.0  # since the start of the run, evaluations and checkpoints included
    train_s: float = 0.0  # training steps alone (data wait, forward, backward, optimizer)


@dataclass
class StepStats:
    loss: float
    targets: int  # target tokens, all ranks
    per_task_sums: dict  # task -> (loss sum, target tokens), all ranks
    grad_norm: float
    tokens: int
    slots: int  # token positions computed (B x T per micro-batch), all ranks
    flops: float
    skipped: bool
    data_s: float
    step_s: float
    extra: dict = field(default_factory=dict)

    @property
    def per_task(self) -> dict:
        """Mean loss per task of this step (tasks with target tokens in it)."""
        return {task: total / count for task, (total, count) in self.per_task_sums.items()}


class Trainer:
    def __init__(self, cfg: RunConfig, env: DistEnv, model, stream, schedule, out_dir: Path, *, hooks=None):
        self.cfg = cfg
        self.env = env
        self.model = model
        self.stream = stream
        self.schedule = schedule  # loaders.curriculum.Schedule or None (one stage "all")
        self.out_dir = Path(out_dir)
        self.hooks = hooks or {}
        self.state = TrainState()
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                           **adamw_kernel(env.device))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, o.warmup_steps, self.progress_after_warmup(s), o.min_lr_ratio))
        self.flops = flops_model_of(model)
        self.peak_flops = device_peak_flops(env.device, cfg.metrics.peak_tflops)
        self.writer = MetricsWriter(self.out_dir, cfg.metrics.tensorboard) if env.is_main else None
        self.ckpt_root = self.out_dir / "checkpoints"
        self.last_checkpoint: Path | None = None
        self.final_losses: dict = {}
        self.last_stats: StepStats | None = None
        self.ended_stage: str | None = None  # the stage the step before a stage switch trained in
        self.stop_signal: str | None = None  # "SIGTERM" once every rank knows of one: checkpoint, stop
        self.signal_received = False  # set by the handler on this rank (stop_on_signals)
        self.signal_time = 0.0  # time.monotonic() of that first SIGTERM
        self.window = LogWindow()  # the steps since the last metrics row (kept in checkpoints)

    # --- state ---------------------------------------------------------------------------
    def per_rank_state(self) -> dict:
        validation = getattr(self, "validation", None)
        return {"scheduler": self.scheduler.state_dict(), "train": self.state.__dict__.copy(),
                "stream": self.stream.state_dict(), "previous_counts": getattr(self, "_previous_counts", {}),
                # metrics rows written so far (rank 0) and the step last validated: a resume cuts
                # metrics.jsonl back to exactly these rows, and does not validate that step twice
                "metrics_rows": self.writer.rows if self.writer else None,
                "last_eval_step": validation.last_step if validation is not None else None,
                # a validation a SIGTERM abandoned at this step: the resumed run does it first
                "pending_eval": validation.pending if validation is not None else None,
                "last_eval": getattr(self, "last_eval", None),  # for summary.json of a resumed finished run
                # the latest logged loss of each task: a resumed run's summary covers the whole run,
                # not only the tasks its own segment logged
                "final_losses": dict(self.final_losses),
                "log_window": self.window.state_dict()}

    def resume(self) -> bool:
        point = ckpt.find_resume_point(self.ckpt_root, self.cfg.checkpoint.resume)
        if point is None:
            return False
        per_rank = ckpt.load_checkpoint(point, self.model, self.optimizer, rank=self.env.rank, world_size=self.env.world_size)
        self.scheduler.load_state_dict(per_rank["scheduler"])
        self.state = TrainState(**per_rank["train"])
        self.stream.load_state_dict(per_rank["stream"])
        self._previous_counts = per_rank.get("previous_counts", {})
        if self.writer is not None and per_rank.get("metrics_rows") is not None:
            self.writer.keep_first_rows(per_rank["metrics_rows"])
        if self.writer is not None:
            self.writer.purge_after_step = self.state.step
        if getattr(self, "validation", None) is not None:
            self.validation.last_step = per_rank.get("last_eval_step")
            self.validation.pending = per_rank.get("pending_eval")
            self.last_eval = per_rank.get("last_eval")
        if per_rank.get("log_window"):
            self.window = LogWindow.from_state(per_rank["log_window"])
        self.final_losses = dict(per_rank["final_losses"]) if "final_losses" in per_rank else self.logged_losses()
        self.last_checkpoint = point
        self.log(f"resumed from {point} at step {self.state.step}")
        if self.budget_reached():
            budget = f"max_steps={self.cfg.max_steps}" if self.cfg.max_steps > 0 else f"max_tokens={self.cfg.max_tokens}"
            self.log(f"this run is already complete ({budget} reached at step {self.state.step}): nothing left to "
                     "train; finishing its outputs (final validation if not yet done, adapter, summary). Raise "
                     "max_steps/max_tokens to train on")
        return True

    def logged_losses(self) -> dict:
        """The latest loss of each task in metrics.jsonl up to the current step: the final losses
        of a checkpoint written before checkpoints stored them."""
        losses: dict = {}
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return losses
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "event" not in row and row.get("step", 0) <= self.state.step:
                losses.update(row.get("loss_per_task") or {})
        return losses

    def save(self) -> None:
        self.last_checkpoint = ckpt.save_checkpoint(self.ckpt_root, self.state.step, self.model, self.optimizer,
                                                    self.per_rank_state(), rank=self.env.rank,
                                                    world_size=self.env.world_size, keep=self.cfg.checkpoint.keep)
        # The adapter of every checkpoint, ready for PEFT without a conversion step.
        ckpt.export_adapter(self.last_checkpoint / "adapter", self.model, rank=self.env.rank, lora_cfg=self.cfg.lora,
                            base_model=self.cfg.model.path or None)
        self.log(f"checkpoint saved: {self.last_checkpoint}")

    def log(self, msg: str) -> None:
        if self.env.is_main:
            from tqdm import tqdm

            tqdm.write(f"[omnitrain] {msg}")

    # --- stages --------------------------------------------------------------------------
    def update_stage(self) -> None:
        """Switch the stream to the stage of the current step/tokens (on the fly, no restart)."""
        if self.schedule is None:
            if self.state.stage_index < 0:
                self.state.stage_index = 0
                self._stage_event("all", list(TASKS))
            return
        index, stage = self.schedule.stage_at(self.state.step, self.state.tokens)
        if index != self.state.stage_index:
            self.ended_stage = self.stage_name() if self.state.stage_index >= 0 else None
            self.state.stage_index = index
            self.stream.set_tasks(list(stage.tasks), stage.weights)
            if hasattr(self.stream, "set_sampler"):
                self.stream.set_sampler(stage.sampler)
            self._stage_event(stage.name, list(stage.tasks))
            if self.state.step > 0 and "on_stage_change" in self.hooks:
                self.hooks["on_stage_change"](self)

    def stage_name(self) -> str:
        if self.schedule is None:
            return "all"
        return self.schedule.stages[self.state.stage_index].name

    def _stage_event(self, name: str, tasks: list[str]) -> None:
        self.log(f"stage '{name}' from step {self.state.step}: tasks {', '.join(tasks)}")
        if self.writer:
            self.writer.write({"event": "stage", "step": self.state.step, "tokens": self.state.tokens,
                               "stage": name, "tasks": tasks})

    # --- one step ------------------------------------------------------------------------
    def train_step(self) -> StepStats:
        t0 = time.perf_counter()
        with record_function("data_wait"):
            micro_batches = self.stream.next_step()
        data_s = time.perf_counter() - t0
        env, model = self.env, self.model
        counts = torch.tensor([sum(target_tokens(mb) for mb in micro_batches),
                               sum(int(mb["num_tokens"]) for mb in micro_batches),
                               sum(token_slots(mb) for mb in micro_batches)], dtype=torch.float64)
        counts = all_reduce_sum(counts.to(env.device)).cpu()
        global_targets, global_tokens, global_slots = int(counts[0]), int(counts[1]), int(counts[2])
        # FSDP averages gradients over ranks; scaling by world size turns that into the sum.
        scale = env.world_size / max(global_targets, 1)
        # Summed on the device and read once after the loop: no host sync per micro-batch.
        stats = torch.zeros(1 + 2 * len(TASKS), dtype=torch.float64, device=env.device)
        flops = 0.0
        inject = (self.state.step + 1) in self.cfg.debug.nonfinite_loss_at  # 1-based, as logged
        for i, mb in enumerate(micro_batches):
            set_gradient_sync(model, i == len(micro_batches) - 1)
            out = model(to_device(mb, env.device))
            loss = out["loss_sum"] * scale
            if inject:
                loss = loss * float("nan")
            with record_function("backward"):
                loss.backward()
            stats[0] += out["loss_sum"].detach().double() * (float("nan") if inject else 1.0)
            stats[1:1 + len(TASKS)] += out["per_task_loss_sum"].detach().double()
            stats[1 + len(TASKS):] += out["per_task_count"].detach().double()
            flops += self.flops.step_flops(**batch_flops_inputs(mb))
        stats = all_reduce_sum(stats).cpu()
        loss_value = float(stats[0]) / max(global_targets, 1)
        per_task_sums = {t: (float(stats[1 + i]), float(stats[1 + len(TASKS) + i]))
                         for i, t in enumerate(TASKS) if stats[1 + len(TASKS) + i] > 0}
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            with record_function("optimizer"):
                self.optimizer.step()
                self.scheduler.step()
            self.state.bad_in_a_row = 0
        else:
            self.state.skipped_steps += 1
            self.state.bad_in_a_row += 1
            self.log(f"step {self.state.step + 1}: non-finite loss/grad norm (loss {loss_value}, grad norm {grad_norm}); "
                     f"update skipped ({self.state.skipped_steps} skipped so far)")
        self.optimizer.zero_grad(set_to_none=True)
        if self.state.bad_in_a_row >= self.cfg.optim.max_bad_steps:
            raise TrainingStopped(
                f"{self.state.bad_in_a_row} steps in a row had a non-finite loss or gradient norm (last at step "
                f"{self.state.step + 1}, counted from 1 as logged). Lower optim.lr, check the data for corrupt samples, or raise optim.max_bad_steps.")
        flops_total = torch.tensor([flops], dtype=torch.float64)
        flops_total = float(all_reduce_sum(flops_total.to(env.device)).cpu())
        return StepStats(loss=loss_value, targets=global_targets, per_task_sums=per_task_sums,
                         grad_norm=grad_norm, tokens=global_tokens,
                         slots=global_slots, flops=flops_total, skipped=not finite, data_s=data_s, step_s=time.perf_counter() - t0)

    # --- the loop ------------------------------------------------------------------------
    def progress_after_warmup(self, step: int) -> float:
        """Fraction of the run done after warmup: by steps, or by tokens for a token budget."""
        warmup = self.cfg.optim.warmup_steps
        if self.cfg.max_steps > 0:
            return (step - warmup) / max(1, self.cfg.max_steps - warmup)
        return self.state.tokens / self.cfg.max_tokens

    def stop_requested(self) -> bool:
        """Whether any rank got SIGTERM: decided by all ranks together (one small all-reduce per
        step with several processes), before the next step's data is fetched."""
        flag = torch.tensor([float(self.signal_received)], dtype=torch.float64)
        if self.env.world_size > 1:
            flag = all_reduce_sum(flag.to(self.env.device)).cpu()
        if flag.item() > 0:
            self.stop_signal = "SIGTERM"
        return self.stop_signal is not None

    def budget_reached(self) -> bool:
        """The run's end: max_steps or max_tokens reached."""
        cfg, state = self.cfg, self.state
        return (cfg.max_steps > 0 and state.step >= cfg.max_steps) or (cfg.max_tokens > 0 and state.tokens >= cfg.max_tokens)

    def done(self) -> bool:
        """Stop training: the end of the run, a SIGTERM, or debug.stop_after_steps (which acts as a
        preemption: it stops to be resumed)."""
        return self.stop_signal is not None or self.budget_reached() or self.stopped_for_debug()

    def stopped_for_debug(self) -> bool:
        """debug.stop_after_steps reached before the end of the run (a stop to be resumed)."""
        return not self.budget_reached() and 0 < self.cfg.debug.stop_after_steps <= self.state.step

    def stopped_by(self) -> str | None:
        """Why a run that has not reached its end stopped: "SIGTERM", "debug.stop_after_steps"; None at the end."""
        if self.stop_signal is not None:
            return self.stop_signal
        return "debug.stop_after_steps" if self.stopped_for_debug() else None

    def train(self) -> dict:
        from tqdm import tqdm

        cfg, env = self.cfg, self.env
        self.model.train()
        # No bar when stderr is a file (torchrun's log redirection, a batch job): its carriage
        # returns would run into the log lines there.
        show_bar = env.is_main and cfg.metrics.progress_bar and sys.stderr.isatty()
        bar = tqdm(total=cfg.max_steps or None, initial=self.state.step, desc="train", disable=not show_bar,
                   dynamic_ncols=True, leave=False)
        start = time.perf_counter()
        wall_before = self.state.wall_s
        profiler = self.hooks.get("profiler")
        with stop_on_signals(self):
            self._run_pending_hook()
            while not self.done():
                # A SIGTERM during setup, or during the previous step's hooks and checkpoint.
                if self.stop_requested():
                    break
                self.update_stage()  # may validate at a stage boundary (abandoned on SIGTERM)
                if self.stop_signal is not None:
                    break
                stats = self.train_step()
                self.last_stats = stats
                self.state.step += 1
                self.state.tokens += stats.tokens
                self.state.slots += stats.slots
                self.state.train_s += stats.step_s
                self.state.wall_s = wall_before + time.perf_counter() - start
                self.window.add(stats)
                if profiler is not None:
                    profiler.step()
                bar.update(1)
                # Decided right after the step, before any evaluation: a stopping job has ~30 s
                # (torchrun's grace period) for its checkpoint, not for a validation pass.
                self.stop_requested()
                if self.state.step % cfg.metrics.log_every == 0 or self.done():
                    self._log_row(stats, self.window)
                    self.window = LogWindow()
                if self.stop_signal is not None:
                    break
                if "after_step" in self.hooks:
                    self.hooks["after_step"](self)
                if cfg.checkpoint.every > 0 and self.state.step % cfg.checkpoint.every == 0 and not self.done():
                    self.save()
            bar.close()
            self.state.wall_s = wall_before + time.perf_counter() - start
            if self.stop_signal is not None:
                self.log(f"{self.stop_signal} received: checkpoint at step {self.state.step}, then stop; "
                         "the same command resumes from it")
            elif self.stopped_for_debug():
                self.log(f"debug.stop_after_steps={self.cfg.debug.stop_after_steps} reached: checkpoint at step "
                         f"{self.state.step}, then stop (as a preempted job); the same command without it resumes")
            elif self.budget_reached() and "on_end" in self.hooks:
                # Before the final checkpoint, which then records it: a resume of the finished
                # run does not validate again, and a longer run keeps this eval row.
                self.hooks["on_end"](self)
                self.state.wall_s = wall_before + time.perf_counter() - start  # the checkpoint records its time
            if self._checkpoint_is_current():
                self.log(f"checkpoint {self.last_checkpoint} already holds step {self.state.step}: not written again")
            else:
                self.save()
        self.state.wall_s = wall_before + time.perf_counter() - start  # the final checkpoint included
        return self.summary()

    def _checkpoint_is_current(self) -> bool:
        """Whether this run's checkpoint folder already holds the current step (a resumed run that
        had nothing left to train, or a stop right after the resume)."""
        last = self.last_checkpoint
        return last is not None and last.parent == self.ckpt_root and ckpt.step_of(last) == self.state.step

    def _run_pending_hook(self) -> None:
        """Work a stopped run left undone at the step it resumes from (a validation pass that a
        SIGTERM abandoned), run before the first new step."""
        if "on_resume" in self.hooks and self.state.step > 0:
            self.hooks["on_resume"](self)

    def _log_row(self, stats: StepStats, window: LogWindow) -> None:
        secs = max(window.step_s, 1e-9)
        tok_s = window.tokens / secs / self.env.world_size  # per device
        mfu = (window.flops / secs / self.env.world_size / self.peak_flops) if self.peak_flops else None
        loss, per_task = window.losses()
        self.final_losses.update(per_task)
        if self.cfg.max_steps > 0:
            steps_left = self.cfg.max_steps - self.state.step
        else:  # a token budget: steps left at this step's token rate
            steps_left = (self.cfg.max_tokens - self.state.tokens) / max(1, stats.tokens)
        row = {"step": self.state.step, "tokens": self.state.tokens, "stage": self.stage_name(),
               "loss": loss, "loss_per_task": per_task, "step_loss": stats.loss,
               "lr": self.scheduler.get_last_lr()[0], "steps_in_row": window.steps,
               "grad_norm": stats.grad_norm, "tokens_per_sec": tok_s, "mfu": mfu,
               "mem_gib": peak_memory_gib(self.env.device), "data_wait_pct": 100.0 * window.data_s / secs,
               "elapsed_s": self.state.wall_s, "skipped_steps": self.state.skipped_steps, "skipped": stats.skipped,
               "eta_s": steps_left * stats.step_s,
               "packing_efficiency": window.tokens / max(window.slots, 1),
               "budget_fill": window.tokens / max(window.steps * self.step_token_budget(), 1)}
        counts = self.stream.counts() if hasattr(self.stream, "counts") else {}
        if counts:
            counts = gather_rank_counts(counts)  # a collective: every rank logs at the same steps
            row["data"] = counts
            row.update(self._mix_since_last_row(counts))
        if self.env.is_main:
            self.writer.write(row)
            self.log(format_line(row, self.cfg.max_steps or "?"))

    def step_token_budget(self) -> int:
        """Token slots one optimizer step may fill, all ranks: grad_accum micro-batches of
        data.max_tokens_per_batch each. Real tokens over this is the budget fill: how full the
        micro-batches are (packing_efficiency is 1.0 for packed rows however short they are)."""
        return self.cfg.optim.grad_accum * self.env.world_size * self.cfg.data.max_tokens_per_batch

    def _mix_since_last_row(self, counts: dict) -> dict:
        """What the model saw since the previous log row: examples per task and per label
        (the stream's counts are cumulative), plus ADS's repeats and embedding hit rate."""
        def delta(now: dict, before: dict) -> dict:
            return {k: (delta(v, before.get(k, {})) if isinstance(v, dict) else v - before.get(k, 0)) for k, v in now.items()}

        previous = getattr(self, "_previous_counts", {})
        out = {"tasks": delta(counts.get("tasks", {}), previous.get("tasks", {}))}
        if "labels" in counts:
            out["labels"] = delta(counts["labels"], previous.get("labels", {}))
        for key in ("repeats", "embedding_hit_rate", "embedding_refreshes", "sampler"):
            if key in counts:
                out[key] = counts[key]
        self._previous_counts = {"tasks": dict(counts.get("tasks", {})),
                                 "labels": {t: dict(v) for t, v in counts.get("labels", {}).items()}}
        return out

    def summary(self) -> dict:
        # Throughput over the training steps alone: evaluations, checkpoints and stage switches
        # are in wall_s, not in tokens/s (else a schedule with more stage boundaries, hence more
        # boundary evaluations, would look slower at training).
        train_s = max(self.state.train_s, 1e-9)
        return {"recipe": self.cfg.recipe, "steps": self.state.step, "tokens": self.state.tokens,
                "tokens_per_sec": self.state.tokens / train_s,
                "tokens_per_sec_per_device": self.state.tokens / train_s / self.env.world_size,
                "train_s": self.state.train_s, "stopped_by": self.stopped_by(),
                "max_steps": self.cfg.max_steps or None, "max_tokens": self.cfg.max_tokens or None,
                "final_loss_per_task": self.final_losses,
                "packing_efficiency": self.state.tokens / max(self.state.slots, 1),
                "budget_fill": self.state.tokens / max(self.state.step * self.step_token_budget(), 1),
                "skipped_steps": self.state.skipped_steps,
                "wall_s": self.state.wall_s, "world_size": self.env.world_size, "device": device_name(self.env.device),
                "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def write_summary(out_dir: Path, summary: dict) -> None:
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
