"""Our LoRA layer, how it is put into the LLM, and its export in PEFT's adapter format.

The layer keeps the frozen base weight under the names nn.Linear uses (`weight`, `bias`) and
the adapters under PEFT's names (`lora_A` [r, in], `lora_B` [out, r]), so an exported adapter
needs no renaming beyond PEFT's `.weight` suffix. The math lives in kernels/lora.py: a fused
Triton kernel on CUDA, its PyTorch reference elsewhere.

Grouping (`lora.grouped`): projections that read the same input run as one call of the grouped
kernels, which read that input once. q, k and v come from one `lora_qkv` call made when the
attention module is entered (a forward pre-hook, so whichever attention forward runs, transformers'
or Liger's, gets them when it calls its projections); gate, up and down run as one `lora_mlp`
call (SwiGLU fused). Parameters and their names do not change: adapters export as before.
A grouped call draws one dropout seed for the group: q, k and v share one mask over x, gate and
up share one, down takes one derived from it (kernels/lora_grouped.py defines these masks).
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from kernels.lora import lora_linear
from kernels.lora_grouped import lora_mlp, lora_qkv

log = logging.getLogger("omnitrain")

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
        # (input, output) left by a grouped q/k/v call (project_qkv) for this projection's next call.
        self.precomputed: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_lora_parameters(self) -> None:
        # PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so training starts at the base model.
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ready, self.precomputed = self.precomputed, None
        if ready is not None and ready[0] is x:
            return ready[1]
        p = self.dropout if self.training else 0.0
        lora_A, lora_B = self.adapters_as(x.dtype)
        return lora_linear(x, self.weight, lora_A, lora_B, self.scale, bias=self.bias, dropout_p=p,
                           seed=draw_dropout_seed(p), impl=self.impl)

    def adapters_as(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_A, lora_B in the compute dtype (they are kept in fp32 for the optimizer)."""
        if self.lora_A.dtype == dtype:
            return self.lora_A, self.lora_B
        return self.lora_A.to(dtype), self.lora_B.to(dtype)

    def same_hyper(self, other: "LoRALinear") -> bool:
        return (self.rank, self.scale, self.dropout, self.impl) == (other.rank, other.scale, other.dropout, other.impl)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, scale={self.scale:g}, dropout={self.dropout}"


def draw_dropout_seed(p: float) -> int | None:
    """The seed of a dropout mask, taken from torch's RNG, so it is saved and restored with the
    RNG state (resume) and replayed by activation checkpointing."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item()) if p > 0 else None


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


# --- grouping: the projections of one input in one grouped kernel call ------------------------
QKV_NAMES = ("q_proj", "k_proj", "v_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
# lora_mlp computes down(silu(gate) * up): it stands in only for MLPs with this activation.
SWIGLU_ACTIVATIONS = ("silu", "swish")


def resolve_lora_grouped(setting) -> bool:
    """`lora.grouped` (auto | true | false) -> whether to group: auto = on, wherever a layer's targets allow."""
    if setting in ("auto", "true") or setting is True:
        return True
    if setting == "false" or setting is False:
        return False
    raise ValueError(f"lora.grouped={setting!r}; use auto, true or false")


def lora_group(module: nn.Module, names: tuple[str, ...]) -> list[LoRALinear] | None:
    """The module's projections `names` if all are LoRA layers with one rank, scale, dropout and impl."""
    projections = [getattr(module, name, None) for name in names]
    if not all(isinstance(p, LoRALinear) for p in projections):
        return None
    if not all(projections[0].same_hyper(p) for p in projections[1:]):
        return None
    return projections


def grouped_adapters(projections: list[LoRALinear], dtype: torch.dtype) -> tuple[list, list]:
    pairs = [p.adapters_as(dtype) for p in projections]
    return [a for a, _ in pairs], [b for _, b in pairs]


def project_qkv(attn: nn.Module, x: torch.Tensor) -> None:
    """q, k, v of x in one lora_qkv call, left in each projection for the attention's own call."""
    projections = [getattr(attn, name) for name in QKV_NAMES]
    first = projections[0]
    p = first.dropout if first.training else 0.0
    lora_As, lora_Bs = grouped_adapters(projections, x.dtype)
    outs = lora_qkv(x, [proj.weight for proj in projections], lora_As, lora_Bs, first.scale,
                    [proj.bias for proj in projections], p, draw_dropout_seed(p), impl=first.impl)
    for proj, out in zip(projections, outs):
        proj.precomputed = (x, out)


def _project_qkv_on_entry(attn: nn.Module, args: tuple, kwargs: dict) -> None:
    project_qkv(attn, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])


def _forget_qkv_on_exit(attn: nn.Module, args: tuple, kwargs: dict, output) -> None:
    # Also runs when the forward raised: no projection keeps an output for a later call.
    for name in QKV_NAMES:
        getattr(attn, name).precomputed = None


def group_qkv(attn: nn.Module) -> None:
    """Hooks, not a new forward: transformers' attention forward and Liger's (engine/attention.py)
    both call q_proj(hidden_states), k_proj(...), v_proj(...), and each finds its output ready."""
    attn.register_forward_pre_hook(_project_qkv_on_entry, with_kwargs=True)
    attn.register_forward_hook(_forget_qkv_on_exit, with_kwargs=True, always_call=True)
    attn.lora_qkv_grouped = True


class GroupedLoRAMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) as one lora_mlp call: gate and up read x once, SwiGLU is fused
    (recomputed in backward). It holds the layer's own LoRA projections: parameter names stay."""

    def __init__(self, gate_proj: LoRALinear, up_proj: LoRALinear, down_proj: LoRALinear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projections = [self.gate_proj, self.up_proj, self.down_proj]
        p = self.gate_proj.dropout if self.training else 0.0
        lora_As, lora_Bs = grouped_adapters(projections, x.dtype)
        return lora_mlp(x, [proj.weight for proj in projections], lora_As, lora_Bs, self.gate_proj.scale, p,
                        draw_dropout_seed(p), impl=self.gate_proj.impl)


def apply_lora_grouping(layers, hidden_act: str) -> dict[str, int]:
    """Group q/k/v and gate/up/down of each decoder layer whose projections are all LoRA layers
    with the same settings; the others keep per-projection LoRA. Returns groups made per kind.

    Apply after Liger (engine/attention.py): its SwiGLU module is replaced by the grouped MLP,
    which fuses SwiGLU itself, and its attention forward keeps the grouped q/k/v.
    """
    made = {"qkv": 0, "mlp": 0}
    for layer in layers:
        attn = layer.self_attn
        if lora_group(attn, QKV_NAMES):
            if not getattr(attn, "lora_qkv_grouped", False):
                group_qkv(attn)
            made["qkv"] += 1
        mlp = lora_group(layer.mlp, MLP_NAMES)
        if mlp and hidden_act in SWIGLU_ACTIVATIONS and all(proj.bias is None for proj in mlp):
            if not isinstance(layer.mlp, GroupedLoRAMLP):
                layer.mlp = GroupedLoRAMLP(*mlp)
            made["mlp"] += 1
    return made


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


def peft_module_tensors(state: dict[str, torch.Tensor], module_path: str, prefix_in_model: str) -> dict[str, torch.Tensor]:
    """A fully trained module's parameters as PEFT ``modules_to_save`` keys
    (`base_model.model.<module>.<param>`, PEFT drops its wrapper's adapter name on save)."""
    start = prefix_in_model + module_path + "."
    return {f"base_model.model.{name[len(prefix_in_model):]}": tensor.detach().to("cpu").contiguous()
            for name, tensor in state.items() if name.startswith(start)}


def save_peft_adapter(out_dir: str | Path, tensors: dict[str, torch.Tensor], *, rank: int, alpha: float,
                      dropout: float, target_regex: str, base_model: str | None,
                      modules_to_save: list[str] | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json that PEFT loads as they are.
    ``modules_to_save``: modules trained in full (their tensors are in ``tensors``), e.g. the
    audio tower with model.train_audio_encoder=true.

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
        "modules_to_save": modules_to_save or None,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return out_dir


def load_adapter_into(model: nn.Module, adapter_dir: str | Path, prefix_in_model: str = "thinker.") -> int:
    """Copy a PEFT adapter's weights into our LoRA layers (unsharded model), and the weights of
    its ``modules_to_save`` (a trained audio tower) into those modules; returns tensors loaded.

    Every adapter tensor must find its layer and every LoRA layer must get its tensors: a
    partial match means the adapter belongs to another model or target set.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    config_path = Path(adapter_dir) / ADAPTER_CONFIG
    saved_modules = (json.loads(config_path.read_text()).get("modules_to_save") or []) if config_path.exists() else []
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}   # buffers: of modules_to_save
    expected = {n for n in params if n.endswith((".lora_A", ".lora_B"))}
    loaded = set()
    for key, value in tensors.items():
        if not key.startswith("base_model.model."):
            raise ValueError(f"{adapter_dir}: unexpected adapter key {key} (not PEFT LoRA format)")
        inner = key[len("base_model.model."):]
        if inner.endswith((".lora_A.weight", ".lora_B.weight")):
            name = prefix_in_model + inner[:-len(".weight")]
        elif any(f".{module}." in f".{inner}" for module in saved_modules):
            name = prefix_in_model + inner        # a module trained in full (modules_to_save)
        else:
            raise ValueError(f"{adapter_dir}: unexpected adapter key {key} (neither a LoRA tensor nor in the "
                             f"config's modules_to_save {saved_modules})")
        if name not in params:
            raise ValueError(f"{adapter_dir}: adapter key {key} has no matching layer ({name}) in this model")
        with torch.no_grad():
            params[name].copy_(value.to(params[name].dtype))
        loaded.add(name)
    missing = expected - loaded
    if missing:
        raise ValueError(f"{adapter_dir}: adapter lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[0]}")
    return len(loaded)
