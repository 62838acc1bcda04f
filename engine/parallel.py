"""Process group and FSDP2, applied in one fixed order.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without it we run as one process with a
single-rank group, so one code path serves 1 CPU process and 64 GPUs. Backend: NCCL on CUDA,
gloo on CPU.

FSDP2 (`model.fsdp`): "auto" shards whenever there is something to shard or cast, i.e. with
more than one rank, or on CUDA (its mixed-precision policy gives bf16 compute with fp32
gradient reduction). A single CPU process has neither: FSDP2 there only adds DTensor dispatch to
every optimizer op and copies of each block's frozen weights into and out of its all-gather
buffers at every forward and backward (measured on the tiny preset: ~8-10% of a step), so
"auto" leaves the model as it is. Everything after this point (trainer, checkpoints, adapter
export) works on both: torch.distributed.checkpoint's state-dict functions take sharded and
plain modules alike, and `set_gradient_sync` is a no-op on a plain module.

Order (torchtitan's, and it matters):
  1. activation checkpointing per LLM decoder layer (option), so the wrapper is what FSDP shards;
  2. torch.compile per decoder layer (option), compiling the block FSDP will call;
  3. fully_shard per audio-encoder block and per LLM decoder layer (one all-gather each);
  4. fully_shard of the token embedding (our forward calls it directly, before the LLM), the
     audio tower and the LLM (their remaining params: convs, aligner projection, final norm);
  5. fully_shard of the root (lm_head), whose forward runs the whole step.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("omnitrain")

# Collectives wait this long before failing: long enough for a slow first step on CPU,
# short enough that a rank stuck at a collective surfaces as an error, not a silent hang.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistEnv:
    """Join torchrun's process group, or make a one-process group when run directly."""
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT,
                                device_id=torch.device("cuda", local) if use_cuda else None)
    else:
        rank, world, local = 0, 1, 0
        if use_cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=PROCESS_GROUP_TIMEOUT)
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def close_distributed() -> None:
    """The success path: a barrier before teardown (on gloo a rank leaving early can abort the
    others at exit). Every rank reaches it only when every rank finished its work. gloo's worker
    threads outlive this (they may still be releasing a finished collective's tensors): a finished
    multi-process run therefore leaves without interpreter finalization (engine/train.py leave_process)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abort_distributed() -> None:
    """The error path: tear down at once, without a barrier. The other ranks may be waiting in a
    collective this rank will never join; a barrier here would wait for them until
    PROCESS_GROUP_TIMEOUT (30 min) instead of letting this process exit, so that torchrun sees
    the failure and stops the other ranks within seconds."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # the group may already be broken by the failure itself
            log.debug("destroy_process_group on the error path: %s", e)


FSDP_SETTINGS = ("auto", "true", "false")


def fsdp_wanted(setting, world_size: int, device: torch.device) -> bool:
    """`model.fsdp` (auto | true | false) -> whether apply_parallelism calls fully_shard."""
    setting = str(setting).lower()
    if setting not in FSDP_SETTINGS:
        raise ValueError(f"model.fsdp={setting!r}; use auto, true or false")
    if setting == "false" and world_size > 1:
        raise ValueError(f"model.fsdp=false with {world_size} processes: each rank would train its own copy "
                         "without reducing gradients. Use model.fsdp=auto (or true), or run one process")
    if setting == "auto":
        return world_size > 1 or device.type == "cuda"
    return setting == "true"


def world_size_now() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def apply_parallelism(model: nn.Module, *, gradient_checkpointing: bool, compile: bool, device: torch.device,
                      fsdp="auto") -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    llm_layers = model.llm.layers
    if gradient_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(list(llm_layers)):
            llm_layers[i] = checkpoint_wrapper(layer, preserve_rng_state=True)
    if compile:
        for i, layer in enumerate(list(llm_layers)):
            llm_layers[i] = torch.compile(layer)
    if not fsdp_wanted(fsdp, world_size_now(), device):
        log.info("FSDP2 not applied: one process on %s, nothing to shard (model.fsdp=%s)", device, fsdp)
        return model

    # bf16 compute and fp32 gradient reduction on GPUs; CPU runs fp32 end to end.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.audio_tower.layers:
        fully_shard(block, mp_policy=mp)
    for layer in llm_layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model.llm.embed_tokens, mp_policy=mp)
    fully_shard(model.audio_tower, mp_policy=mp)
    fully_shard(model.llm, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce gradients across ranks in this backward (FSDP2) or not (an accumulating micro-batch)."""
    if hasattr(model, "set_requires_gradient_sync"):  # a plain module has no gradients to reduce
        model.set_requires_gradient_sync(enabled)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
