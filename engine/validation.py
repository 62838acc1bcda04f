"""Validation during training: teacher-forced loss, label accuracy and a bounded generation pass.

    validator = attach_validation(trainer, cfg, env, model, tokenizer)   # after building the Trainer
    summary["eval"] = final_validation(trainer)   # after trainer.train(), which validated at the end

One validation (``Validator.run``) does, on every rank at once:
  1. teacher forcing over this rank's validation batches (``shards[rank::world_size]``): loss
     sums and counts per task, and for did/ser whether the first answer token is predicted
     right (the label's first token; the cheap signal that moves first on small runs);
  2. greedy generation over at most ``eval.max_samples`` samples of the whole validation set,
     split across ranks (engine.generation), each scored with ``engine.scoring.score``.
Sums and predictions are combined over ranks, so every rank ends with the same eval row and
that row equals the one a 1-process run computes (up to float summation order).

Lockstep under FSDP: every forward all-gathers parameters, so every rank must make the same
number of forward calls. Ranks hold different numbers of samples (shards split unequally), so
each rank pads its batch list to the longest one with dummy batches (a copy of one of its own
batches, results discarded, counted in the row as ``dummy_batches``), and decoding goes on
until every rank's rows have finished: an "any row unfinished" flag is all-reduced before
each decoding step, and a rank whose rows are done keeps running (and discarding) forwards
until the flag says all are done.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from engine.generation import (IGNORE_INDEX, all_gather_objects, banned_token_ids, collate_prompts,
                               generation_batches, greedy_decode, max_over_ranks, select_for_generation,
                               split_batch_rows, stop_token_ids)
from engine.parallel import DistEnv, all_reduce_sum
from loaders.rank_counts import merge_rank_counts
from engine.scoring import PredictionRecord, closed_label_sets, score_records
from engine.trainer import to_device
from loaders.tasks import TASKS

LABEL_ACCURACY_TASKS = ("did", "ser")


def scalar_metrics(metrics_by_task: dict[str, dict]) -> dict[str, dict]:
    """The numbers of each task's metrics (no confusion matrix or per-label tables): what
    metrics.jsonl and TensorBoard keep per validation."""
    return {task: {name: value for name, value in metrics.items()
                   if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))}
            for task, metrics in metrics_by_task.items()}


# --- the validator ------------------------------------------------------------------------

class ValidationAbandoned(Exception):
    """A validation pass stopped part-way (every rank at the same batch): the job is stopping."""


def stop_if_asked(should_stop) -> None:
    if should_stop is not None and should_stop():
        raise ValidationAbandoned


class Validator:
    """Validation of one rank, in lockstep with the others (see the module docstring)."""

    def __init__(self, cfg, env: DistEnv, model, tokenizer, *, max_generated: int | None = None):
        from loaders.sources import no_validation_reason
        from loaders.val_batches import build_val_batches

        self.cfg, self.env, self.model, self.tokenizer = cfg, env, model, tokenizer
        self.max_new_tokens = cfg.eval.max_new_tokens
        self.max_generated = cfg.eval.max_samples if max_generated is None else max_generated
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batches = build_val_batches(cfg.data, tokenizer, rank=env.rank, world_size=env.world_size)
        # The validation set's counts over every rank: read = used + skipped (by reason)
        merged = merge_rank_counts(all_gather_objects(self.batches.counts))
        self.val_data = {key: merged[key] for key in ("records", "read", "used", "skipped")}
        counts = all_gather_objects(len(self.batches))
        self.examples_per_rank = all_gather_objects(sum(len(b["keys"]) for b in self.batches))
        self.enabled = max(counts) > 0
        self.disabled_reason = None if self.enabled else no_validation_reason(cfg.data, self.val_data)
        if not self.enabled:
            return
        # A rank whose shards held no usable sample still has to run the same forwards: it
        # borrows one batch, as a template for its dummy batches, from the first rank with data.
        self.template = self.batches[0] if self.batches else None
        if min(counts) == 0:
            source = [rank for rank, count in enumerate(counts) if count > 0][0]
            box = [self.template]
            dist.broadcast_object_list(box, src=source)
            self.template = box[0]
        self.num_loss_batches = max(counts)
        self._prepare_generation()

    def _prepare_generation(self) -> None:
        where = [(b, row) for b, batch in enumerate(self.batches) for row in range(len(batch["keys"]))]
        candidates = [(self.batches[b]["tasks"][row], self.batches[b]["keys"][row]) for b, row in where]
        chosen = select_for_generation(all_gather_objects(candidates), self.max_generated)
        selected = []
        for index, order in chosen[self.env.rank].items():  # only the chosen rows are copied out
            b, row = where[index]
            (sample,) = split_batch_rows(self.batches[b], self.tokenizer, rows=[row])
            sample.order = order
            selected.append(sample)
        self.n_generated = sum(len(c) for c in chosen)
        self.gen_batches = generation_batches(selected, self.cfg.data.max_tokens_per_batch,
                                              self.max_new_tokens, self.pad_id)
        self.num_gen_batches = max_over_ranks(len(self.gen_batches), self.env.device)
        self.gen_template = collate_prompts(split_batch_rows(self.template, self.tokenizer, rows=[0]), self.pad_id)
        self.stop_ids = stop_token_ids(self.tokenizer)
        # A sharded lm_head weight is a DTensor: its shape is the global one.
        self.banned_ids = banned_token_ids(self.tokenizer, int(self.model.lm_head.weight.shape[0]))

    # --- the two passes -----------------------------------------------------------------
    def teacher_forced(self, should_stop=None) -> tuple[dict, dict, int]:
        """(val_loss per task, val_label_acc for did/ser, dummy batches of this rank)."""
        n = len(TASKS)
        # loss sums, token counts, first-token hits, rows with a first target; per task
        sums = torch.zeros(4 * n, dtype=torch.float64)
        dummies = 0
        for index in range(self.num_loss_batches):
            stop_if_asked(should_stop)
            real = index < len(self.batches)
            batch = self.batches[index] if real else self.template
            out = self.model(to_device(batch, self.env.device), mode="eval")
            if not real:
                dummies += 1
                continue
            sums[:n] += out["per_task_loss_sum"].detach().double().cpu()
            sums[n:2 * n] += out["per_task_count"].detach().double().cpu()
            task_ids = batch["task_ids"]
            has_target = (out["first_target"] != IGNORE_INDEX).cpu()
            hits = ((out["first_pred"] == out["first_target"]).cpu() & has_target).double()
            sums[2 * n:3 * n] += torch.bincount(task_ids, weights=hits, minlength=n)
            sums[3 * n:] += torch.bincount(task_ids, weights=has_target.double(), minlength=n)
        sums = all_reduce_sum(sums.to(self.env.device)).cpu()
        val_loss = {task: float(sums[i] / sums[n + i]) for i, task in enumerate(TASKS) if sums[n + i] > 0}
        label_acc = {task: float(sums[2 * n + i] / sums[3 * n + i]) for i, task in enumerate(TASKS)
                     if task in LABEL_ACCURACY_TASKS and sums[3 * n + i] > 0}
        return val_loss, label_acc, dummies

    def generate(self, should_stop=None) -> tuple[list[dict], int]:
        """(every rank's predictions in selection order, dummy batches of this rank)."""
        records, dummies = [], 0
        for index in range(self.num_gen_batches):
            stop_if_asked(should_stop)
            real = index < len(self.gen_batches)
            batch = self.gen_batches[index] if real else self.gen_template
            generated = greedy_decode(self.model, batch, max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                                      banned_ids=self.banned_ids, device=self.env.device, dummy=not real)
            if not real:
                dummies += 1
                continue
            for sample, ids in zip(batch["samples"], generated):
                records.append({"order": sample.order, "task": sample.task, "key": sample.key,
                                "prediction": self.tokenizer.decode(ids, skip_special_tokens=True),
                                "reference": sample.reference})
        gathered = [record for part in all_gather_objects(records) for record in part]
        gathered.sort(key=lambda record: record["order"])
        return [{k: v for k, v in record.items() if k != "order"} for record in gathered], dummies

    def score(self, records: list[dict]) -> dict[str, dict]:
        """Full metrics per task (score_records), against the recipe's closed label sets."""
        if not records:
            return {}
        labels = closed_label_sets(self.cfg.data.dialects, self.cfg.data.emotions)
        return score_records([PredictionRecord(r["task"], r["prediction"], r["reference"]) for r in records], labels)

    def run(self, *, step: int, tokens: int, stage: str, should_stop=None) -> dict | None:
        """The ``"event": "eval"`` row (the same on every rank), or None when disabled.
        ``should_stop``: asked before every batch, on every rank at the same batch (it may be a
        collective, like the trainer's stop_requested); True abandons the pass (ValidationAbandoned)."""
        if not self.enabled:
            return None
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                val_loss, label_acc, loss_dummies = self.teacher_forced(should_stop)
                records, gen_dummies = self.generate(should_stop)
        finally:
            self.model.train(was_training)
        self.last_records = records
        dummy_batches = int(all_reduce_sum(torch.tensor([loss_dummies + gen_dummies], dtype=torch.int64,
                                                        device=self.env.device)).item())
        return {"event": "eval", "step": step, "tokens": tokens, "stage": stage, "val_loss": val_loss,
                "val_label_acc": label_acc, "metrics": scalar_metrics(self.score(records)),
                "n_val_examples": sum(self.examples_per_rank), "val_data": self.val_data,
                "n_generated": len(records),
                "dummy_batches": dummy_batches, "eval_s": time.perf_counter() - start}


# --- wiring into the trainer --------------------------------------------------------------

def format_eval_line(row: dict) -> str:
    losses = " ".join(f"{task} {value:.3f}" for task, value in row["val_loss"].items())
    parts = [f"eval @ step {row['step']}: val loss {losses or '-'}"]
    headline = {"asr": "wer", "sum": "rougeL", "did": "macro_f1", "ser": "macro_f1"}
    scores = [f"{task} {name} {row['metrics'][task][name]:.3f}" for task, name in headline.items()
              if row["metrics"].get(task, {}).get(name) is not None]
    if scores:
        parts.append(", ".join(scores))
    if row["val_label_acc"]:
        parts.append("label acc " + " ".join(f"{t} {v:.3f}" for t, v in row["val_label_acc"].items()))
    parts.append(f"{row['n_generated']} generated, {row['dummy_batches']} dummy batches, {row['eval_s']:.1f} s")
    return " | ".join(parts)


class TrainingValidation:
    """Runs the validator from the trainer's hooks, at most once per step, and records the rows.
    A SIGTERM abandons a pass between batches (the job checkpoints and stops); the checkpoint
    records it as pending and the resumed run validates that step first."""

    def __init__(self, validator: Validator, every: int):
        self.validator, self.every = validator, every
        self.last_step: int | None = None
        self.trained_stage: str | None = None  # the stage the latest step trained in
        self.pending: dict | None = None  # {"step", "stage"} of an abandoned pass

    def validate(self, trainer, stage: str | None = None) -> dict | None:
        step = trainer.state.step
        if step == self.last_step:
            return trainer.last_eval
        stage = stage or trainer.stage_name()
        try:
            row = self.validator.run(step=step, tokens=trainer.state.tokens, stage=stage,
                                     should_stop=trainer.stop_requested)
        except ValidationAbandoned:
            self.pending = {"step": step, "stage": stage}
            trainer.log(f"validation at step {step} abandoned ({trainer.stop_signal}); the resumed run does it first")
            return None
        self.last_step, self.pending = step, None
        if row is not None:
            trainer.last_eval = row
            if trainer.writer is not None:
                trainer.writer.write(row)
            trainer.log(format_eval_line(row))
        return row

    def after_step(self, trainer) -> None:
        self.trained_stage = trainer.stage_name()
        if self.every > 0 and trainer.state.step % self.every == 0:
            self.validate(trainer)

    def on_stage_change(self, trainer) -> None:
        # The model at a boundary is the product of the stage that just ended: label it so (the
        # trainer's record of it also holds right after a resume, before any step was trained).
        self.validate(trainer, stage=getattr(trainer, "ended_stage", None) or self.trained_stage)

    def on_end(self, trainer) -> None:
        """The end of the run (max_steps / max_tokens reached): the final validation, if eval.at_end."""
        if trainer.cfg.eval.at_end:
            self.validate(trainer, stage=self.trained_stage)

    def on_resume(self, trainer) -> None:
        pending = self.pending
        if pending is not None and pending["step"] == trainer.state.step:
            trainer.log(f"validation at step {pending['step']} (abandoned when the run stopped) runs now")
            self.validate(trainer, stage=pending["stage"])


def _chain(first, second):
    if first is None:
        return second

    def both(trainer):
        first(trainer)
        second(trainer)
    return both


def labels_sharing_a_first_token(tokenizer, data_cfg) -> list[str]:
    """did/ser labels whose responses begin with the same token: first-token label accuracy
    (val_label_acc) cannot tell them apart, e.g. "ary" and "arz" under a character tokenizer."""
    from loaders.prompts import first_target_token

    clashes = []
    for task, labels in (("did", data_cfg.dialects), ("ser", data_cfg.emotions)):
        by_token: dict[int, list[str]] = {}
        for label in labels or ():
            by_token.setdefault(first_target_token(tokenizer, label), []).append(label)
        clashes += [f"{task}: {', '.join(group)}" for group in by_token.values() if len(group) > 1]
    return clashes


def attach_validation(trainer, cfg, env: DistEnv, model, tokenizer) -> Validator:
    """Validate every ``eval.every`` steps and at each curriculum stage switch; hooks already
    registered on the trainer still run (first)."""
    validator = Validator(cfg, env, model, tokenizer)
    trainer.last_eval = None
    if not validator.enabled:
        trainer.log(f"validation disabled ({validator.disabled_reason}); set data.val to validation shards "
                    "to get eval rows")
        return validator
    skipped = validator.val_data["skipped"]
    if skipped:
        reasons = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
        trainer.log(f"validation data: {sum(skipped.values())} of {validator.val_data['read']} examples skipped "
                    f"({reasons}); the eval rows' val_data has the counts")
    trainer.log(f"validation: {sum(validator.examples_per_rank)} examples (per rank {validator.examples_per_rank}), "
                f"generation on {validator.n_generated}, every {cfg.eval.every or 'stage boundary'} "
                f"step(s){', and at the end' if cfg.eval.at_end else ''}")
    clashes = labels_sharing_a_first_token(tokenizer, cfg.data)
    if clashes:
        trainer.log(f"note: val_label_acc checks a label's first token, and these labels share theirs ({'; '.join(clashes)}): "
                    "it counts them as one; the generation metrics (accuracy, macro_f1) tell them apart")
    hooks = TrainingValidation(validator, cfg.eval.every)
    trainer.validation = hooks
    trainer.hooks["after_step"] = _chain(trainer.hooks.get("after_step"), hooks.after_step)
    trainer.hooks["on_stage_change"] = _chain(trainer.hooks.get("on_stage_change"), hooks.on_stage_change)
    trainer.hooks["on_resume"] = _chain(trainer.hooks.get("on_resume"), hooks.on_resume)
    trainer.hooks["on_end"] = _chain(trainer.hooks.get("on_end"), hooks.on_end)
    return validator


def final_validation(trainer) -> dict | None:
    """The last eval row's metrics per task, for summary.json (None without validation). The
    final validation itself runs in the trainer's ``on_end`` hook (when eval.at_end and the run
    reached max_steps / max_tokens, not at debug.stop_after_steps, which acts as a preemption),
    before the final checkpoint, so that the checkpoint records it."""
    if getattr(trainer, "validation", None) is None:
        return None
    row = getattr(trainer, "last_eval", None)
    return row["metrics"] if row else None
