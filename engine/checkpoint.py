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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from engine.lora import peft_module_tensors, peft_state_dict, save_peft_adapter

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


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


def save_checkpoint(root: Path, step: int, model, optimizer, per_rank: dict, *, rank: int, world_size: int, keep: int) -> Path:
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
        (tmp / META).write_text(json.dumps({"step": step, "world_size": world_size}))
        if final.exists():
            shutil.rmtree(final)
        commit_checkpoint(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def find_resume_point(root: Path, resume: str) -> Path | None:
    """`auto`: the latest complete checkpoint (or None); `never`: None; else a step folder path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(Path(root))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / META).exists():
        raise FileNotFoundError(f"checkpoint.resume={resume}: no complete checkpoint there (no {META}); "
                                f"use checkpoint.resume=auto or a step_XXXXXXXX folder")
    return path


def load_checkpoint(path: Path, model, optimizer, *, rank: int, world_size: int) -> dict:
    meta = json.loads((Path(path) / META).read_text())
    if meta["world_size"] != world_size:
        raise RuntimeError(f"checkpoint {path} was written by {meta['world_size']} processes, this run has {world_size}: "
                           "the loader position is per rank, so resume with the same number of processes")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    # Frozen weights are not in the checkpoint: load non-strictly, then check that exactly
    # the frozen ones were absent.
    result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                            options=StateDictOptions(ignore_frozen_params=True, strict=False))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in getattr(result, "missing_keys", []) if clean_module_name(k) in {clean_module_name(t) for t in trainable}]
    if missing or getattr(result, "unexpected_keys", []):
        raise RuntimeError(f"checkpoint {path} does not match this model: missing {missing[:3]}, "
                           f"unexpected {list(getattr(result, 'unexpected_keys', []))[:3]} (different LoRA targets or rank?)")
    per_rank = torch.load(Path(path) / f"rank{rank}.pt", weights_only=False)
    set_rng_state(per_rank.pop("rng"))
    return per_rank


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
