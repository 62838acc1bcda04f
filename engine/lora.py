"""Our LoRA layer, how it is put into the LLM, and its export in PEFT's adapter format.

The layer keeps the frozen base weight under the names nn.Linear uses (`weight`, `bias`) and
the adapters under PEFT's names (`lora_A` [r, in], `lora_B` [out, r]), so an exported adapter
needs no renaming beyond PEFT's `.weight` suffix. The math lives in kernels/lora.py: a fused
Triton kernel on CUDA, its PyTorch reference elsewhere.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from kernels.lora import lora_linear

# PEFT's adapter files: what `PeftModel.from_pretrained` reads.
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with W and b frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, impl: str):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = dropout
        self.impl = impl
        dev = base.weight.device
        # Adapters stay fp32 (the optimizer's precision); FSDP's mixed precision casts them.
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so training starts at the base model.
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        # The dropout mask is drawn from a seed taken from torch's RNG, so it is saved and
        # restored with the RNG state (resume) and replayed by activation checkpointing.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p > 0 else None
        lora_A, lora_B = self.lora_A, self.lora_B
        if lora_A.dtype != x.dtype:
            lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        return lora_linear(x, self.weight, lora_A, lora_B, self.scale, bias=self.bias, dropout_p=p, seed=seed, impl=self.impl)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, scale={self.scale:g}, dropout={self.dropout}"


def lora_target_regex(llm_layers_path: str, targets: list[str]) -> str:
    """A pattern anchored at the LLM's decoder layers, so the audio encoder's q/k/v never match.

    PEFT applies a string `target_modules` with re.fullmatch to each module name, so the same
    pattern is written into adapter_config.json.
    """
    names = "|".join(re.escape(t) for t in targets)
    return rf"^{re.escape(llm_layers_path)}\.\d+\.(self_attn|mlp)\.({names})$"


def apply_lora(root: nn.Module, pattern: str, rank: int, alpha: float, dropout: float, impl: str) -> list[str]:
    """Replace every nn.Linear whose name (relative to `root`) fully matches `pattern`."""
    regex = re.compile(pattern)
    replaced = []
    for name, module in list(root.named_modules()):
        if isinstance(module, nn.Linear) and regex.fullmatch(name):
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            setattr(parent, child, LoRALinear(module, rank, alpha, dropout, impl))
            replaced.append(name)
    if not replaced:
        raise ValueError(f"LoRA targets matched no linear layer (pattern {pattern}); check lora.targets")
    return replaced


def peft_state_dict(lora_state: dict[str, torch.Tensor], prefix_in_model: str) -> dict[str, torch.Tensor]:
    """Our parameter names -> PEFT's adapter keys (`base_model.model.<module>.lora_A.weight`)."""
    out = {}
    for name, tensor in lora_state.items():
        if not (name.endswith(".lora_A") or name.endswith(".lora_B")):
            continue
        if prefix_in_model and name.startswith(prefix_in_model):
            name = name[len(prefix_in_model):]
        out[f"base_model.model.{name}.weight"] = tensor.detach().to("cpu").contiguous()
    return out


def save_peft_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], *, rank: int, alpha: float,
                      dropout: float, target_regex: str, base_model: str | None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json that PEFT loads as they are.

    The config is written directly (PEFT fills every field not given with its default), so a
    training run never imports peft, and through it bitsandbytes.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_regex,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out_dir


def load_adapter_into(model: nn.Module, adapter_dir: str | Path, prefix_in_model: str = "thinker.") -> int:
    """Copy a PEFT adapter's weights into our LoRA layers (unsharded model); returns tensors loaded.

    Every adapter tensor must find its layer and every LoRA layer must get its tensors: a
    partial match means the adapter belongs to another model or target set.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    params = dict(model.named_parameters())
    expected = {n for n in params if n.endswith((".lora_A", ".lora_B"))}
    loaded = set()
    for key, value in tensors.items():
        if not key.startswith("base_model.model.") or not key.endswith(".weight"):
            raise ValueError(f"{adapter_dir}: unexpected adapter key {key} (not PEFT LoRA format)")
        name = prefix_in_model + key[len("base_model.model."):-len(".weight")]
        if name not in params:
            raise ValueError(f"{adapter_dir}: adapter key {key} has no matching LoRA layer ({name}) in this model")
        with torch.no_grad():
            params[name].copy_(value.to(params[name].dtype))
        loaded.add(name)
    missing = expected - loaded
    if missing:
        raise ValueError(f"{adapter_dir}: adapter lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[0]}")
    return len(loaded)
