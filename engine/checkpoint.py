"""Resumable checkpoints (DCP) and PEFT adapter export.

A checkpoint is a folder `<output_dir>/checkpoints/step_00000040/` holding:
  - the trainable weights and the optimizer state, saved with torch.distributed.checkpoint
    (each rank writes its own shards; a different world size can load them);
  - `rank<r>.pt` per rank: scheduler, step counters, RNG states, loader state;
  - `meta.json`, written last.
It is written under a hidden temporary name and renamed when every rank has finished, so a
crash during a save leaves the previous checkpoint as the latest complete one.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from engine.lora import peft_module_tensors, peft_state_dict, save_peft_adapter

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint this run cannot use or a run folder it must not write into; the message says what to do."""


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (those with meta.json), oldest first."""
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / META).exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def commit_checkpoint(tmp: Path, final: Path) -> None:
    """The atomic step: a rename within one folder. Kept separate so tests can fail it."""
    tmp.rename(final)


def save_checkpoint(root: Path, step: int, model, optimizer, per_rank: dict, *, rank: int, world_size: int, keep: int,
                    config: dict | None = None) -> Path:
    """`config`: the run's resolved settings, stored in meta.json so that a resume can check that it
    continues the same run; by default the run folder's config.yaml (<root>/../config.yaml), which
    the run writing this checkpoint wrote at its start."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({**per_rank, "rng": rng_state()}, tmp / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        meta = {"step": step, "world_size": world_size, "tokens": per_rank.get("train", {}).get("tokens"),
                "config": config if config is not None else run_config_of(root)}
        (tmp / META).write_text(json.dumps(meta, ensure_ascii=False))
        replaced = None
        if final.exists():  # a step written again: the old copy goes only once the new one is in place
            replaced = root / f".step_{step:08d}.replaced"
            if replaced.exists():
                shutil.rmtree(replaced)
            final.rename(replaced)
        try:
            commit_checkpoint(tmp, final)
        except BaseException:
            if replaced is not None:  # the old copy stays the checkpoint of this step
                replaced.rename(final)
            raise
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        # Keep the one just written and the keep-1 latest others. By step, the one just written
        # is normally the latest; it is never rotated away even when it is not (plan_resume
        # refuses to write a lower step into a folder with later checkpoints: a second guard).
        others = [p for p in list_checkpoints(root) if p != final]
        for old in (others[:len(others) - (keep - 1)] if keep > 0 else []):
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def run_config_of(root: Path) -> dict | None:
    """The resolved config.yaml of the run folder holding checkpoints/ `root`, as JSON-ready data."""
    path = Path(root).parent / "config.yaml"
    if not path.exists():
        return None
    import yaml

    return json.loads(json.dumps(yaml.safe_load(path.read_text(encoding="utf-8"))))


def damaged_checkpoint(folder: Path, name: str, problem: str) -> CheckpointError:
    """The error for a checkpoint with a missing or unreadable file: which folder, which file, and
    how to go on (from the previous checkpoint, or in a new output_dir)."""
    folder = Path(folder)
    earlier = [p for p in list_checkpoints(folder.parent) if p.name < folder.name]
    if earlier:
        way_on = (f"remove {folder} and run the same command again to resume from the previous checkpoint "
                  f"({earlier[-1]})")
    else:
        way_on = (f"no earlier checkpoint is left in {folder.parent}: train again in a new output_dir (or remove "
                  "this run folder)")
    return CheckpointError(f"checkpoint {folder} is damaged: {name} {problem}. It cannot be resumed; {way_on}")


def first_line(error: BaseException) -> str:
    """The first sentence of an error's message (torch's own go on for lines), or its class name."""
    text = str(error).strip()
    return (text.splitlines()[0].split(". ")[0][:300] if text else "") or type(error).__name__


def read_meta(path: Path) -> dict:
    file = Path(path) / META
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise damaged_checkpoint(path, META, "is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged_checkpoint(path, META, f"cannot be read ({first_line(e)})") from None
    missing = [key for key in ("step", "world_size") if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise damaged_checkpoint(path, META, f"lacks {', '.join(missing)}")
    return meta


def check_checkpoint_files(path: Path, ranks) -> None:
    """The files a resume of `ranks` reads: present and not empty (a copy cut short, a full disk)."""
    path = Path(path)
    for name in [".metadata"] + [f"rank{r}.pt" for r in ranks] + sorted(p.name for p in path.glob("*.distcp")):
        file = path / name
        if not file.is_file():
            raise damaged_checkpoint(path, name, "is missing")
        if file.stat().st_size == 0:
            raise damaged_checkpoint(path, name, "is empty")


def weights_error(path: Path, error: BaseException) -> CheckpointError:
    """DCP's load error: weights of other shapes (another LoRA or model setting), else a damaged file.
    DCP's own error is a per-rank traceback dump: name the likely cause instead."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    mismatch = next((line for line in lines if "size" in line.lower() or "mismatch" in line.lower()), None)
    if mismatch is not None:
        return CheckpointError(f"checkpoint {path} does not fit this model ({mismatch[:300]}): it was written with "
                               "other LoRA or model settings (lora.rank, lora.targets, model.*). Resume with the "
                               "settings of its run (its config.yaml), or start a new run in a new output_dir")
    problem = lines[-1][:300] if lines else type(error).__name__
    files = ", ".join(sorted(p.name for p in Path(path).glob("*.distcp"))) or "*.distcp"
    return damaged_checkpoint(path, f"its weights ({files}, .metadata)", f"cannot be read ({problem})")


def find_resume_point(root: Path, resume: str) -> Path | None:
    """`auto`: the latest complete checkpoint (or None); `never`: None; else a step folder path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(Path(root))
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume={resume} does not exist; give a step_XXXXXXXX folder of a run's "
                              "checkpoints/ (or checkpoint.resume=auto for the latest in output_dir)")
    if not (path / META).exists():
        raise CheckpointError(f"checkpoint.resume={resume}: no complete checkpoint there (no {META}); "
                                f"use checkpoint.resume=auto or a step_XXXXXXXX folder")
    return path


def load_checkpoint(path: Path, model, optimizer, *, rank: int, world_size: int) -> dict:
    check_world_size(path, read_meta(path), world_size)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_sd, "optim": optim_sd}
    check_checkpoint_files(path, [rank])
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:   # DCP's CheckpointException is a BaseException
        raise weights_error(path, e) from e
    # Frozen weights are not in the checkpoint: load non-strictly, then check that exactly
    # the frozen ones were absent.
    result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                            options=StateDictOptions(ignore_frozen_params=True, strict=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in getattr(result, "missing_keys", []) if clean_module_name(k) in {clean_module_name(t) for t in trainable}]
    if missing or getattr(result, "unexpected_keys", []):
        raise CheckpointError(f"checkpoint {path} does not match this model: missing {missing[:3]}, "
                           f"unexpected {list(getattr(result, 'unexpected_keys', []))[:3]} (different LoRA targets or rank?)")
    try:
        per_rank = torch.load(Path(path) / f"rank{rank}.pt", weights_only=False)
    except Exception as e:   # a truncated or overwritten file: torch's zip reader or unpickler fails
        raise damaged_checkpoint(path, f"rank{rank}.pt", f"cannot be read ({first_line(e)})") from e
    if not isinstance(per_rank, dict) or "rng" not in per_rank or "train" not in per_rank:
        raise damaged_checkpoint(path, f"rank{rank}.pt", "does not hold this engine's per-rank state")
    set_rng_state(per_rank.pop("rng"))
    return per_rank


def check_world_size(path: Path, meta: dict, world_size: int) -> None:
    if meta["world_size"] != world_size:
        raise CheckpointError(f"checkpoint {path} was written by {meta['world_size']} processes, this run has {world_size}: "
                              "the loader position is per rank, so resume with the same number of processes")


def clean_module_name(name: str) -> str:
    """Parameter names without the wrappers' segments (activation checkpointing, torch.compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def full_module_state(module) -> dict[str, torch.Tensor]:
    """A module's state dict unsharded on the CPU (collective under FSDP2: every rank calls)."""
    from torch.distributed.tensor import DTensor

    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
            for name, t in module.state_dict().items()}


def export_adapter(out_dir: Path, model, *, rank: int, lora_cfg, base_model: str | None) -> Path | None:
    """Gather the LoRA weights on rank 0 and write a PEFT adapter folder (collective: all ranks call)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    # A trained audio tower is saved whole (PEFT's modules_to_save wants every tensor of the
    # module, frozen ones included): gathered here, on every rank, in one order.
    tower = full_module_state(model.audio_tower) if model.train_audio_encoder else {}
    if rank != 0:
        return None
    tensors = peft_state_dict({clean_module_name(k): v for k, v in full.items()}, prefix_in_model="thinker.")
    modules_to_save = None
    if model.train_audio_encoder:
        path = model.parts.audio_path
        tensors.update(peft_module_tensors({f"thinker.{path}.{k}": v for k, v in tower.items()}, path, "thinker."))
        modules_to_save = [path.rsplit(".", 1)[-1]]
    return save_peft_adapter(out_dir, tensors, rank=lora_cfg.rank, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout,
                             target_regex=model.lora_pattern, base_model=base_model, modules_to_save=modules_to_save)


# --- resume: which checkpoint, and whether this run may continue it -----------------------------

# Settings a resumed run may change: how the run is observed, saved and evaluated, and which
# kernels compute the same math. Every other setting is fixed by the checkpoint, because it
# decides the trained weights' shapes and meaning (lora.rank/alpha/dropout/targets, model.preset/
# path/dtype/seed/train_audio_encoder), lives in the saved optimizer and LR-scheduler state and
# would be silently ignored (optim.lr, betas, weight_decay), or decides which samples come in
# which batches (data.* but the three below, seed, schedule.*, optim.grad_accum), which a resumed
# run promises to keep. max_steps/max_tokens may change (a run is extended) with a warning: the
# cosine LR and stages given as fractions of the run move with them. A key ending in "." is a section.
CHANGEABLE_ON_RESUME = (
    "output_dir", "max_steps", "max_tokens",
    "checkpoint.", "metrics.", "profiler.", "eval.", "debug.",
    "data.val", "data.on_error", "data.strict",
    "model.attn_backend", "model.liger", "model.gradient_checkpointing", "model.compile", "model.fsdp",
    "model.last_layer_on_targets",
    "lora.impl", "lora.grouped", "loss.impl",
    "optim.grad_clip", "optim.max_bad_steps", "optim.warmup_steps", "optim.min_lr_ratio",
)


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(Path(path).name).group(1))


def flatten_settings(tree: dict, prefix: str = "") -> dict:
    """{"lora": {"rank": 8}} -> {"lora.rank": 8}; lists stay whole values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def may_change_on_resume(key: str, new: dict) -> bool:
    if key == "data.demo_dir" and new.get("data.train"):  # the demo set is read only when data.train is ""
        return True
    return any(key.startswith(c) if c.endswith(".") else key == c for c in CHANGEABLE_ON_RESUME)


def changeable_settings_text() -> str:
    return ", ".join(c + "*" if c.endswith(".") else c for c in CHANGEABLE_ON_RESUME)


def fixed_settings_that_differ(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, this run's value) for each fixed setting that changed. Keys one side
    lacks (settings added or removed between versions of the engine) cannot be compared."""
    flat_old, flat_new = flatten_settings(old), flatten_settings(new)
    return [(key, flat_old[key], value) for key, value in flat_new.items()
            if key in flat_old and flat_old[key] != value and not may_change_on_resume(key, flat_new)]


def plan_resume(out_dir: Path, cfg, world_size: int) -> tuple[Path | None, list[str]]:
    """Before anything is written into output_dir: the checkpoint this run continues (None: a
    fresh start) and warnings for the log. Raises CheckpointError where going on would mix two
    runs in one folder or continue a run with settings that break it."""
    from engine.config import config_to_dict

    out_dir = Path(out_dir)
    root = out_dir / "checkpoints"
    existing = list_checkpoints(root)
    resume = cfg.checkpoint.resume
    if resume == "never":
        metrics = out_dir / "metrics.jsonl"
        found = [p.name for p in existing] + (["metrics.jsonl"] if metrics.exists() and metrics.stat().st_size else [])
        if found:
            raise CheckpointError(
                f"output_dir={out_dir} already holds a run ({', '.join(found)}) and checkpoint.resume=never starts a "
                "new one: its files would mix with the old run's. Use a new output_dir, remove the old folder, or "
                "continue the old run with checkpoint.resume=auto")
        return None, []
    point = find_resume_point(root, resume)
    if point is None:
        if (out_dir / "summary.json").exists():
            raise CheckpointError(
                f"output_dir={out_dir} holds a finished run (summary.json) but no checkpoint to continue from "
                f"(none complete in {root}): starting again would overwrite its metrics, adapter and summary. Use a "
                "new output_dir, or remove the old folder to train it again from step 0")
        return None, []
    meta = read_meta(point)
    # Before the run folder is written and the model built: every rank's files are there.
    check_checkpoint_files(point, range(meta["world_size"]) if isinstance(meta["world_size"], int) else [0])
    later = [p.name for p in existing if step_of(p) > meta["step"]]
    if later:
        raise CheckpointError(
            f"checkpoint.resume={resume} continues from step {meta['step']}, but {root} already holds later "
            f"checkpoints ({', '.join(later)}): the new run's checkpoints and metrics would mix with them. Resume from "
            "the latest (checkpoint.resume=auto), or continue from this one into a new folder: "
            f"checkpoint.resume={point} output_dir=<a new folder>")
    old = meta.get("config")
    if old is None:
        check_world_size(point, meta, world_size)
        return point, [f"checkpoint {point} stores no settings (written by an older version): this run's settings "
                       "cannot be checked against its run; resume only with the same LoRA, model, data, schedule, "
                       "optimizer and seed settings"]
    new = json.loads(json.dumps(config_to_dict(cfg)))
    changed = fixed_settings_that_differ(old, new)
    if changed:
        listed = "; ".join(f"{key}: {json.dumps(a, ensure_ascii=False)} -> {json.dumps(b, ensure_ascii=False)}"
                           for key, a, b in changed)
        raise CheckpointError(
            f"checkpoint {point} belongs to a run with other settings, which cannot change on resume: {listed}. "
            "Resume with the checkpoint's values, or start a new run in a new output_dir (the settings that may change "
            f"on resume: {changeable_settings_text()})")
    check_world_size(point, meta, world_size)
    return point, budget_change_warnings(point, meta, old, cfg)


def budget_change_warnings(point: Path, meta: dict, old: dict, cfg) -> list[str]:
    """A changed max_steps/max_tokens moves the cosine LR and every stage given as a fraction of the
    run: name the stage the run was in at the checkpoint and the one it resumes into."""
    old_steps, old_tokens = old.get("max_steps", cfg.max_steps), old.get("max_tokens", cfg.max_tokens)
    if (old_steps, old_tokens) == (cfg.max_steps, cfg.max_tokens):
        return []
    step, tokens = meta["step"], meta.get("tokens") or 0
    before = cfg.schedule.build(old_steps or None, old_tokens or None).stage_at(step, tokens)[1]
    after = cfg.schedule.build(cfg.max_steps or None, cfg.max_tokens or None).stage_at(step, tokens)[1]
    stage = (f"it stays in stage '{after.name}'" if before.name == after.name else
             f"it was in stage '{before.name}' ({', '.join(before.tasks)}) and resumes in stage '{after.name}' "
             f"({', '.join(after.tasks)})")
    changes = ", ".join(f"{name} {a} -> {b}" for name, a, b in (("max_steps", old_steps, cfg.max_steps),
                                                              ("max_tokens", old_tokens, cfg.max_tokens)) if a != b)
    return [f"resuming {point} (step {step}) with {changes}: the cosine LR schedule and stages given as fractions "
            f"of the run move; {stage}"]
