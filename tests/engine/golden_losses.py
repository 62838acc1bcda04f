"""Golden losses: every step's logged losses of short real CLI runs on the tiny preset, stored in
tests/engine/golden/<run>.json and compared by tests/engine/test_golden_losses.py.

A golden file holds, per logged step: the stage, the real tokens of the step, the examples per
task, `step_loss` and `loss_per_task` (metrics.jsonl, one row per step with metrics.log_every=1),
plus what it was made with: the command's settings, the run's resolved config.yaml, the torch /
transformers / numpy versions. Losses are compared within a tolerance measured on this project
(see LOSS_REL_TOL); token and example counts, stages and the tasks present must match exactly.

Rewrite the golden files after an intended change (a new default, a fixed bug, new demo data):

    OMNITRAIN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/engine/test_golden_losses.py
"""
from __future__ import annotations

import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

from engine.metrics import flatten_dict

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN_FORMAT = 1
UPDATE_ENV = "OMNITRAIN_UPDATE_GOLDEN"
UPDATE_COMMAND = f"{UPDATE_ENV}=1 .venv/bin/python -m pytest tests/engine/test_golden_losses.py"

# Loss tolerance: |got - expected| <= LOSS_ABS_TOL + LOSS_REL_TOL * |expected|, per step and task.
# Measured on this project's 2-core CPU machine (torch 2.13 CPU, the 12-step golden runs, losses
# 4-7 nats): the same run repeated is bit-identical (3 runs each of hybrid_padded and
# hybrid_packed, 5 of hybrid_fsdp2); OMP_NUM_THREADS=1 vs 2 moves a loss by at most 2.2e-7
# relative (hybrid_padded 2.1e-7, hybrid_packed 2.2e-7, hybrid_fsdp2 1.2e-7), and so do other
# kernels of the same math (loss.impl=naive: 1.5e-7, model.attn_backend=eager: 2.4e-7). Token and
# example counts never moved. The tolerance is torchtune's for its recipe loss tests (rtol=1e-4,
# atol=1e-4): ~500x that spread, room for other CPUs and torch builds, while real changes fail:
# optim.lr 3e-3 -> 3.3e-3 moves the losses of every step from step 2 on by 4e-3 to 1.5e-2
# relative, lora.dropout 0.05 -> 0.06 moves step 3 by 1.6e-3.
MEASURED_MAX_REL_SPREAD = 2.4e-7
LOSS_REL_TOL = 1e-4
LOSS_ABS_TOL = 1e-4

# Settings recorded but not compared: where the run wrote and read, which differ on every machine.
RUN_SPECIFIC_KEYS = ("output_dir", "data.train", "data.demo_dir")


def versions() -> dict:
    """The library versions the numbers depend on (kernels, summation order, random streams)."""
    import numpy
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def step_records(metrics_rows: list[dict]) -> list[dict]:
    """One record per metrics.jsonl step row: what the golden file keeps. `tokens` is the step's
    own real-token count (the rows hold the cumulative count)."""
    records, before = [], 0
    for row in metrics_rows:
        if "event" in row:
            continue
        if row.get("steps_in_row", 1) != 1:
            raise ValueError(f"metrics row of step {row['step']} covers {row['steps_in_row']} steps: golden runs "
                             "need metrics.log_every=1 so that every step is logged")
        records.append({"step": row["step"], "stage": row["stage"], "tokens": row["tokens"] - before,
                        "examples": dict(row.get("tasks", {})), "step_loss": row["step_loss"],
                        "loss_per_task": dict(row["loss_per_task"])})
        before = row["tokens"]
    return records


def flat_config(config: dict) -> dict:
    """config.yaml as {dotted key: value}, without the run-specific paths."""
    return {key: value for key, value in flatten_dict(config, sep=".").items() if key not in RUN_SPECIFIC_KEYS}


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


STEPS_MARK = "<steps>"


def write_golden(name: str, *, command: str, settings: dict, config: dict, records: list[dict]) -> Path:
    path = golden_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    golden = {"format": GOLDEN_FORMAT, "run": name, "command": command, "settings": settings,
              "versions": versions(), "made_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "config": flat_config(config), "steps": records}
    # One line per step: a regenerated file's diff shows which steps moved.
    text = json.dumps({**golden, "steps": STEPS_MARK}, indent=1, ensure_ascii=False)
    steps = ",\n  ".join(json.dumps(record, ensure_ascii=False) for record in records)
    path.write_text(text.replace(json.dumps(STEPS_MARK), f"[\n  {steps}\n ]") + "\n", encoding="utf-8")
    return path


def read_golden(name: str) -> dict:
    path = golden_path(name)
    if not path.exists():
        raise FileNotFoundError(f"no golden file {path}; make it with: {UPDATE_COMMAND}")
    golden = json.loads(path.read_text(encoding="utf-8"))
    if golden.get("format") != GOLDEN_FORMAT:
        raise ValueError(f"{path} has format {golden.get('format')}, this test reads format {GOLDEN_FORMAT}; "
                         f"regenerate it: {UPDATE_COMMAND}")
    return golden


def loss_close(expected: float | None, got: float | None) -> bool:
    if expected is None or got is None:  # a skipped (non-finite) step is logged as null
        return expected is None and got is None
    return math.isfinite(got) and abs(got - expected) <= LOSS_ABS_TOL + LOSS_REL_TOL * abs(expected)


def _loss_problem(step: int, what: str, expected, got) -> str:
    if expected is None or got is None:
        return f"step {step}, {what}: expected {expected}, got {got}"
    rel = abs(got - expected) / max(abs(expected), 1e-12)
    return (f"step {step}, {what}: expected {expected:.6f}, got {got:.6f} "
            f"(diff {got - expected:+.2e}, relative {rel:.1e}; "
            f"tolerance {LOSS_ABS_TOL:g} + {LOSS_REL_TOL:g} x expected)")


def compare_steps(expected: list[dict], got: list[dict]) -> list[str]:
    """Every difference beyond the tolerance, one line each, in step order."""
    problems = []
    if [r["step"] for r in got] != [r["step"] for r in expected]:
        problems.append(f"logged steps: expected {[r['step'] for r in expected]}, got {[r['step'] for r in got]}")
    by_step = {r["step"]: r for r in got}
    for want in expected:
        step, have = want["step"], by_step.get(want["step"])
        if have is None:
            continue
        for key in ("stage", "tokens", "examples"):  # exact: the data path is deterministic
            if have[key] != want[key]:
                problems.append(f"step {step}, {key}: expected {want[key]}, got {have[key]} (must match exactly)")
        if not loss_close(want["step_loss"], have["step_loss"]):
            problems.append(_loss_problem(step, "step_loss", want["step_loss"], have["step_loss"]))
        if set(have["loss_per_task"]) != set(want["loss_per_task"]):
            problems.append(f"step {step}, tasks with a loss: expected {sorted(want['loss_per_task'])}, "
                            f"got {sorted(have['loss_per_task'])}")
        for task, value in want["loss_per_task"].items():
            if task in have["loss_per_task"] and not loss_close(value, have["loss_per_task"][task]):
                problems.append(_loss_problem(step, f"task {task} loss", value, have["loss_per_task"][task]))
    return problems


def config_changes(golden_config: dict, config_now: dict) -> list[str]:
    now = flat_config(config_now)
    keys = sorted(set(golden_config) | set(now))
    return [f"{key}: {golden_config.get(key, '<absent>')!r} -> {now.get(key, '<absent>')!r}"
            for key in keys if golden_config.get(key, "<absent>") != now.get(key, "<absent>")]


def failure_message(golden: dict, problems: list[str], config_now: dict, log: Path | None = None,
                    shown: int = 12) -> str:
    """What differs, why it may differ, and how to accept the change."""
    lines = [f"golden run '{golden['run']}': {len(problems)} difference(s) from {golden_path(golden['run'])}:"]
    lines += ["  " + p for p in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    changed = config_changes(golden.get("config", {}), config_now)
    if changed:
        lines.append("settings that differ from the golden run's config.yaml: " + "; ".join(changed))
    made_with = golden.get("versions", {})
    differ = [f"{k} {made_with.get(k)} -> {v}" for k, v in versions().items() if made_with.get(k) != v]
    if differ:
        lines.append(f"library versions differ from the golden's: {', '.join(differ)} (the tolerance is meant to "
                     "cover other versions; if only small loss differences fail, the new version is the likely "
                     "cause: check the numbers, then regenerate)")
    if log is not None:
        lines.append(f"run log: {log}")
    lines.append(f"If the change is intended, regenerate the golden files and commit them: {UPDATE_COMMAND}")
    return "\n".join(lines)
