"""Build everything a run needs from its config, train, write the outputs.

train.py stays a thin main; tests and benchmarks call `run_training(cfg)` in-process too.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engine import checkpoint as ckpt
from engine.aligner_refresh import attach_aligner_refresh
from engine.attention import resolve_attn_backend, resolve_liger
from engine.config import ConfigError, RunConfig, save_config
from engine.metrics import MetricsWriter
from engine.model import build_model, count_parameters
from engine.parallel import (DistEnv, abort_distributed, apply_parallelism, close_distributed, fsdp_wanted,
                             init_distributed)
from engine.tokenizer import build_tiny_tokenizer, load_checkpoint_tokenizer
from engine.trainer import Trainer, write_summary
from engine.validation import attach_validation, final_validation
from loaders.rank_counts import gather_rank_counts
from loaders.sources import check_given_shards_exist, data_sources_note
from loaders.tasks import TASKS
from kernels.linear_cross_entropy import resolve_loss_impl
from kernels.lora import resolve_lora_impl
from profiling.memory_report import format_memory_report, memory_report

log = logging.getLogger("omnitrain")


def say(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(f"[omnitrain] {msg}", flush=True)


def dtype_summary(model) -> str:
    """e.g. "frozen bfloat16, trainable float32": what the base and the trained weights are held in."""
    def names(params) -> str:
        return "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in params})) or "-"
    params = list(model.parameters())
    return (f"frozen {names(p for p in params if not p.requires_grad)}, "
            f"trainable {names(p for p in params if p.requires_grad)}")


def build_tokenizer(cfg: RunConfig):
    return load_checkpoint_tokenizer(cfg.model.path) if cfg.model.path else build_tiny_tokenizer()


def prepare_output_dir(cfg: RunConfig, env: DistEnv, finished: dict | None) -> Path:
    """`finished`: the summary of the complete run this one resumes (kept in place: a rerun that
    fails leaves the finished run's results as they were)."""
    out = Path(cfg.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        # Written when this run ends or stops: a run in progress, or one that failed, has none
        # (not an earlier segment's, which could say "stopped_by": "SIGTERM").
        if finished is None:
            (out / "summary.json").unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()
    return out


def resolve_impls(cfg: RunConfig, env: DistEnv) -> None:
    """Turn `auto` into the concrete kernel choice once, log it, and fail early on a bad one."""
    try:   # their messages name the setting and what to choose instead: one error line, not a traceback
        cfg.lora.impl = resolve_lora_impl(cfg.lora.impl, env.device)
        cfg.loss.impl = resolve_loss_impl(cfg.loss.impl, env.device)
        cfg.model.attn_backend = resolve_attn_backend(cfg.model.attn_backend, env.device, packing=cfg.data.packing)
        cfg.model.liger = resolve_liger(cfg.model.liger, env.device)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    fsdp = fsdp_wanted(cfg.model.fsdp, env.world_size, env.device)   # fails early on a bad setting
    say(env, f"kernels: lora={cfg.lora.impl}, loss={cfg.loss.impl}; attention={cfg.model.attn_backend}, "
             f"liger={cfg.model.liger}, packing={cfg.data.packing}; device={env.device}, "
             f"world size {env.world_size} ({env.backend}), FSDP2 {'on' if fsdp else 'off'} (model.fsdp={cfg.model.fsdp})")


def tasks_without_data_note(schedule, data_counts: dict) -> str | None:
    """One line for the start of a run: the tasks the schedule's stages name that have no example
    in data.train (summed over its sources), the stages they leave short, and what to do; None
    when every named task has data. Such a task is never drawn: its stages train the others."""
    have = {task for per_source in data_counts.values() for task, n in per_source.get("tasks", {}).items() if n > 0}
    stages = [stage for stage in schedule.stages if set(stage.tasks) - have]
    if not stages:
        return None
    missing = [task for task in TASKS if any(task in stage.tasks for stage in stages) and task not in have]
    affected = "; ".join(
        f"'{stage.name}' ({', '.join(stage.tasks)}) trains "
        + (", ".join(t for t in stage.tasks if t in have) + " only" if set(stage.tasks) & have else "nothing")
        for stage in stages)
    return (f"data: task(s) {', '.join(missing)} named by the schedule have no examples in data.train (tasks with "
            f"examples: {', '.join(t for t in TASKS if t in have) or 'none'}); stage(s) {affected}. Add shards with "
            f"{', '.join(missing)} samples to data.train, or use a schedule whose stages name only the tasks you have "
            "(schedule.* in the recipe)")


def build_stream(cfg: RunConfig, tokenizer, env: DistEnv):
    from loaders.pipeline import TrainStream

    return TrainStream(cfg.data, tokenizer, rank=env.rank, world_size=env.world_size,
                       grad_accum=cfg.optim.grad_accum, seed=cfg.seed, schedule_cfg=cfg.schedule)


def profiler_context(cfg: RunConfig, env: DistEnv, out: Path):
    """torch.profiler with one trace per rank under <output_dir>/traces/, or a no-op."""
    if not cfg.profiler.enabled:
        return contextlib.nullcontext(None)
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
    trace_dir = out / "traces"
    trace_dir.mkdir(parents=True, exist_ok=True)

    def on_ready(prof):
        path = trace_dir / f"rank{env.rank}-step{prof.step_num}.json"
        prof.export_chrome_trace(str(path))
        say(env, f"profiler trace written: {path}")

    sched = schedule(wait=cfg.profiler.wait, warmup=cfg.profiler.warmup, active=cfg.profiler.active, repeat=1)
    return profile(activities=activities, schedule=sched, on_trace_ready=on_ready, record_shapes=False)


def inject_rank_failure(trainer: Trainer, cfg: RunConfig, env: DistEnv) -> None:
    """debug.fail_on_rank: an error on one rank after a step while the others go on into the next
    step's collectives (fault injection for tests; off by default)."""
    rank, step = cfg.debug.fail_on_rank, cfg.debug.fail_at_step
    if rank != env.rank:
        return
    previous = trainer.hooks.get("after_step")

    def fail_after_step(t: Trainer) -> None:
        if previous is not None:
            previous(t)
        if t.state.step == step:
            raise RuntimeError(f"injected failure on rank {rank} after step {step} (debug.fail_on_rank={rank})")

    trainer.hooks["after_step"] = fail_after_step


def inject_sigterm_in_eval(trainer: Trainer, cfg: RunConfig, env: DistEnv) -> None:
    """debug.sigterm_on_rank: that rank gets SIGTERM as the validation at sigterm_in_eval_at_step
    begins, while the other ranks do not (fault injection for tests; off by default)."""
    rank, step = cfg.debug.sigterm_on_rank, cfg.debug.sigterm_in_eval_at_step
    validation = getattr(trainer, "validation", None)
    if rank != env.rank or validation is None:
        return
    validator = validation.validator
    run = validator.run

    def run_after_sigterm(**kwargs):
        if kwargs["step"] == step and not trainer.signal_received:
            os.kill(os.getpid(), signal.SIGTERM)
        return run(**kwargs)

    validator.run = run_after_sigterm


def run_training(cfg: RunConfig) -> dict:
    env = init_distributed()
    try:
        summary = _run(cfg, env)
    except BaseException:
        # No barrier on failure: the other ranks may be stuck in a collective this rank left.
        abort_distributed()
        raise
    close_distributed()
    return summary


def finished_summary(cfg: RunConfig, point: Path | None) -> dict | None:
    """The summary.json of the run in output_dir when `point` is its final checkpoint: the run is
    complete (its budget reached at that step) and the summary was written from that checkpoint.
    A rerun of it trains nothing and must keep these results, adding only what is missing."""
    path = Path(cfg.output_dir) / "summary.json"
    if point is None or not path.exists():
        return None
    meta = ckpt.read_meta(point)
    complete = ((cfg.max_steps > 0 and meta["step"] >= cfg.max_steps)
                or (cfg.max_tokens > 0 and (meta.get("tokens") or 0) >= cfg.max_tokens))
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None   # unreadable: this run writes a new one
    if not complete or not isinstance(summary, dict) or summary.get("stopped_by") or summary.get("steps") != meta["step"]:
        return None
    return summary


def keep_finished_results(summary: dict, finished: dict | None) -> dict:
    """The finished run's values win; this rerun adds only the keys it lacks (or holds as null)."""
    if finished is None:
        return summary
    return {**summary, **{key: value for key, value in finished.items() if value is not None}}


def check_resume(cfg: RunConfig, env: DistEnv) -> Path | None:
    """Decide what this run continues before anything is written into output_dir (config.yaml
    included): refuse to mix runs or to change fixed settings; cut metrics.jsonl back to the step
    the run resumes from, so that its rows follow without duplicates."""
    point, warnings = ckpt.plan_resume(Path(cfg.output_dir), cfg, env.world_size)
    for line in warnings:
        say(env, f"warning: {line}")
    if env.is_main:
        step = ckpt.read_meta(point)["step"] if point is not None else -1
        removed = MetricsWriter.keep_rows_up_to(Path(cfg.output_dir), step)
        if removed and point is not None:
            say(env, f"metrics.jsonl: {removed} row(s) after step {step} removed (written after the checkpoint this "
                     "run resumes from); this run's rows follow")
        elif removed:
            say(env, f"metrics.jsonl: {removed} row(s) of an earlier start without a checkpoint removed; "
                     "this run starts at step 0")
    return point


def _run(cfg: RunConfig, env: DistEnv) -> dict:
    point = check_resume(cfg, env)
    check_given_shards_exist(cfg.data)   # before the run folder is written and the model is built
    finished = finished_summary(cfg, point) if env.is_main else None
    out = prepare_output_dir(cfg, env, finished)
    say(env, f"run folder: {out}")
    say(env, data_sources_note(cfg.data))
    resolve_impls(cfg, env)
    tokenizer = build_tokenizer(cfg)
    # Identical weights on every rank before sharding: the init seed does not depend on rank.
    model = build_model(cfg.model, cfg.lora, cfg.loss, tokenizer, env.device)
    n = count_parameters(model)
    source = cfg.model.path or f"preset {cfg.model.preset}"
    say(env, f"model: Qwen2.5-Omni thinker ({source}), {n['total'] / 1e6:.2f}M parameters, "
             f"{n['trainable'] / 1e6:.3f}M trainable (LoRA r={cfg.lora.rank} on {len(model.lora_modules)} projections; "
             f"grouped q/k/v in {model.lora_grouping['qkv']} and gate/up/down in {model.lora_grouping['mlp']} of "
             f"{len(model.llm.layers)} layers, lora.grouped={cfg.lora.grouped}); weights: {dtype_summary(model)}")
    apply_parallelism(model, gradient_checkpointing=cfg.model.gradient_checkpointing, compile=cfg.model.compile,
                      device=env.device, fsdp=cfg.model.fsdp)
    # Dropout and sampling differ per rank; everything is reproducible from cfg.seed.
    torch.manual_seed(cfg.seed + 1000 * env.rank)
    stream = build_stream(cfg, tokenizer, env)
    schedule = cfg.schedule.build(cfg.max_steps or None, cfg.max_tokens or None)
    for line in schedule.describe():
        say(env, f"schedule: {line}")
    note = tasks_without_data_note(schedule, stream.data_counts)
    if note:   # decided from the data's counts now, not when a stage with such a task starts
        say(env, note)
    uses_ads = any(stage.sampler == "ads" for stage in schedule.stages)
    if uses_ads:   # compiled now (seconds) rather than inside the first ADS step
        from loaders.ads import absent_labels_note_for, compile_k_center

        compile_k_center()
        note = absent_labels_note_for(cfg.data, stream.data_counts)
        if note:   # decided from the data's counts now, not when the first ADS stage starts
            say(env, note)
    if cfg.model.train_audio_encoder and uses_ads:
        attach_aligner_refresh(model, stream)
        say(env, f"ADS embeddings: refreshed from the training forward (trainable audio encoder), handed to ADS "
                 f"every {cfg.schedule.embedding_refresh_every} steps, cache of {cfg.schedule.embedding_cache}")
    trainer = Trainer(cfg, env, model, stream, schedule, out)
    attach_validation(trainer, cfg, env, model, tokenizer)
    inject_rank_failure(trainer, cfg, env)
    inject_sigterm_in_eval(trainer, cfg, env)
    trainer.resume()
    with profiler_context(cfg, env, out) as prof:
        if prof is not None:
            trainer.hooks["profiler"] = prof
        summary = trainer.train()
    trained = time.perf_counter()
    summary["memory"] = memory_report(model, trainer.optimizer, env.device)
    say(env, format_memory_report(summary["memory"]))
    summary["eval"] = final_validation(trainer)
    adapter_dir = out / "adapter"
    ckpt.export_adapter(adapter_dir, model, rank=env.rank, lora_cfg=cfg.lora, base_model=cfg.model.path or None)
    summary["adapter_dir"] = str(adapter_dir)
    summary["wall_s"] += time.perf_counter() - trained  # the final validation and adapter export too
    if hasattr(stream, "counts"):
        summary["data"] = gather_rank_counts(stream.counts())  # a collective: every rank
    if env.is_main:
        if finished is not None:
            say(env, "summary.json: the finished run's results kept (steps, losses, times, throughput, memory, "
                     "eval); only what it lacked is added")
        summary = keep_finished_results(summary, finished)
        write_summary(out, summary)
        ended = "done"
        if summary.get("stopped_by"):
            command = ("the same command without debug.stop_after_steps" if summary["stopped_by"] == "debug.stop_after_steps"
                       else "the same command")
            ended = (f"stopped by {summary['stopped_by']} before the end of the run (checkpoint "
                     f"{summary['last_checkpoint']}; {command} resumes)")
        say(env, f"{ended}: {summary['steps']} steps, {summary['tokens']:,} tokens, "
                 f"{summary['tokens_per_sec_per_device']:,.0f} tok/s per device, micro-batches "
                 f"{summary['budget_fill']:.0%} full; adapter: {adapter_dir}")
    trainer.close()
    if hasattr(stream, "close"):
        stream.close()
    return summary
