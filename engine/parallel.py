"""Process group and FSDP2, applied in one fixed order.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without it we run as one process with a
single-rank group, so one code path (FSDP2 included) serves 1 CPU process and 64 GPUs.
Backend: NCCL on CUDA, gloo on CPU.

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
    """A barrier before teardown: on gloo a rank leaving early can abort the others at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def apply_parallelism(model: nn.Module, *, gradient_checkpointing: bool, compile: bool, device: torch.device) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    llm_layers = model.llm.layers
    if gradient_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(list(llm_layers)):
            llm_layers[i] = checkpoint_wrapper(layer, preserve_rng_state=True)
    if compile:
        for i, layer in enumerate(list(llm_layers)):
            llm_layers[i] = torch.compile(layer)

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


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
