"""Where the memory of a LoRA training run goes: parameters, gradients, optimizer state, activations.

    report = memory_report(model, optimizer, device)     # after the last step of a run
    print(format_memory_report(report))

Measured, not estimated:
  parameters       the bytes of every parameter tensor (this rank's shard under FSDP), split
                   into frozen and trainable;
  gradients        one gradient per trainable parameter: the bytes of `.grad` where it is held,
                   else of a tensor of the parameter's shape and dtype (the gradient that exists
                   from backward to zero_grad; zero_grad(set_to_none=True) frees it between steps);
  optimizer state  the bytes of every tensor in optimizer.state (AdamW: exp_avg, exp_avg_sq, step);
  peak             CUDA: torch.cuda.max_memory_allocated (the caching allocator's high-water mark
                   since the process started or the last reset_peak_memory_stats);
                   CPU: the process's peak resident set size (getrusage ru_maxrss);
  peak activations the peak minus parameters, gradients and optimizer state. On CPU this also
                   holds the Python/torch runtime and libraries (a few hundred MiB), which the
                   process peak cannot separate out.
"""
from __future__ import annotations

import resource
import sys

import torch
from torch import nn

GIB = 2**30
# ru_maxrss is in KiB on Linux and in bytes on macOS (getrusage(2) on each system).
RU_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes this process holds for `tensor`: the local shard of a DTensor (FSDP2), else the tensor."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def parameter_bytes(model: nn.Module) -> dict:
    frozen = trainable = 0
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            trainable += tensor_bytes(p)
        else:
            frozen += tensor_bytes(p)
    return {"frozen": frozen, "trainable": trainable}


def gradient_bytes(model: nn.Module) -> int:
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        total += tensor_bytes(p.grad) if p.grad is not None else tensor_bytes(p)
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += tensor_bytes(value)
    return total


def process_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_UNIT


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device | str) -> dict:
    """Memory by category in GiB for `model` trained by `optimizer` on `device` (see the module doc)."""
    device = torch.device(device)
    params = parameter_bytes(model)
    grads = gradient_bytes(model)
    optim = optimizer_state_bytes(optimizer)
    report = {"device": str(device)}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        report["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        report["peak_source"] = "torch.cuda.max_memory_allocated"
    else:
        peak = process_peak_rss_bytes()
        report["peak_source"] = "process peak RSS (getrusage); activations include the Python/torch runtime"
    persistent = params["frozen"] + params["trainable"] + grads + optim
    report.update({
        "parameters_gib": (params["frozen"] + params["trainable"]) / GIB,
        "frozen_parameters_gib": params["frozen"] / GIB,
        "trainable_parameters_gib": params["trainable"] / GIB,
        "gradients_gib": grads / GIB,
        "optimizer_state_gib": optim / GIB,
        "peak_gib": peak / GIB,
        "peak_activations_gib": max(0, peak - persistent) / GIB,
    })
    return report


def format_memory_report(report: dict, title: str = "memory") -> str:
    """A few aligned lines: one per category, GiB with 3 decimals (tiny models are MiB-sized)."""
    rows = [("parameters (frozen)", report["frozen_parameters_gib"]),
            ("parameters (trainable)", report["trainable_parameters_gib"]),
            ("gradients", report["gradients_gib"]),
            ("optimizer state", report["optimizer_state_gib"]),
            ("peak activations", report["peak_activations_gib"]),
            ("peak", report["peak_gib"])]
    lines = [f"{title} ({report['device']}; peak from {report['peak_source']})"]
    lines += [f"  {name:<24}{gib:>10.3f} GiB" for name, gib in rows]
    return "\n".join(lines)
