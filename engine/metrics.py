"""Throughput, MFU, memory and the per-step log line (LogWindow: the steps of one row); metrics.jsonl,
TensorBoard, summary.json.

MFU (model FLOPs utilization) = useful FLOPs per second / the device's peak bf16 dense rate.
Useful FLOPs of one LoRA training step, written out (N_* are parameter counts):

  LLM linear layers   4 * N_llm * T        forward 2N, backward 2N for the input gradient only
                                           (the base weights are frozen: no weight gradient)
                      - 4 * N_last * (T - T_tgt)
                                           N_last = the last layer's o_proj and MLP weights:
                                           position-wise, and only their target rows reach the
                                           loss (engine/target_rows.py)
  LoRA adapters       6 * N_lora * T       forward, input and weight gradients
                      - 6 * N_lora_last * (T - T_tgt)   the same for the last layer's adapters
  attention           6 * L * d * sum_i s_i^2
                                           causal QK^T and AV forward = 2 * s^2 * d per layer
                                           (half of the 4 s^2 d of full attention), backward 2x
  lm_head             4 * H * V * T_tgt    only target rows reach the vocabulary projection
  audio encoder       2 * N_enc * P        forward only while frozen; P = encoder positions
                                           (mel frames after the stride-2 conv)

T = real (non-padding) tokens, s_i = length of sample i, d = heads * head_dim, T_tgt = target
tokens. Padding is not counted: MFU measures useful work, so padding shows up as lost MFU, and
so does a last layer run on every row (model.last_layer_on_targets=false).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.target_rows import last_layer_position_wise
from loaders.tasks import TASKS

# Peak dense bf16 tensor-core TFLOP/s by device name (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}


def device_peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of the device, or None where no peak is known (CPU): MFU is then not reported."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():  # longest-match first: dict order above
        if key in name:
            return tflops * 1e12
    return None


@dataclass
class FlopsModel:
    n_llm: int  # LLM linear-layer parameters (decoder layers, base weights)
    n_lora: int
    n_layers: int
    attn_dim: int  # heads * head_dim
    hidden: int
    vocab: int
    n_encoder: int  # audio encoder parameters
    n_llm_last: int = 0  # of n_llm: the last layer's o_proj and MLP (useful on target rows only)
    n_lora_last: int = 0  # of n_lora: their adapters

    def step_flops(self, *, tokens: int, sum_sq_lengths: int, target_tokens: int, encoder_positions: int) -> float:
        other_rows = tokens - target_tokens
        return (4 * self.n_llm * tokens + 6 * self.n_lora * tokens
                - 4 * self.n_llm_last * other_rows - 6 * self.n_lora_last * other_rows
                + 6 * self.n_layers * self.attn_dim * sum_sq_lengths
                + 4 * self.hidden * self.vocab * target_tokens
                + 2 * self.n_encoder * encoder_positions)


def flops_model_of(model) -> FlopsModel:
    text_cfg = model.thinker.config.get_text_config()
    n_llm = n_lora = 0
    for name, p in model.llm.named_parameters():
        if ".layers." not in f".{name}" or p.dim() < 2:
            continue
        if name.endswith("lora_A") or name.endswith("lora_B"):
            n_lora += p.numel()
        else:
            n_llm += p.numel()
    last = {id(p) for module in last_layer_position_wise(model.llm) for p in module.parameters()}
    n_llm_last = n_lora_last = 0
    for name, p in model.llm.named_parameters():
        if id(p) not in last or p.dim() < 2:
            continue
        if name.endswith("lora_A") or name.endswith("lora_B"):
            n_lora_last += p.numel()
        else:
            n_llm_last += p.numel()
    n_enc = sum(p.numel() for p in model.audio_tower.parameters())
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    return FlopsModel(n_llm=n_llm, n_lora=n_lora, n_layers=text_cfg.num_hidden_layers,
                      attn_dim=text_cfg.num_attention_heads * head_dim, hidden=text_cfg.hidden_size,
                      vocab=text_cfg.vocab_size, n_encoder=n_enc, n_llm_last=n_llm_last, n_lora_last=n_lora_last)


def batch_flops_inputs(batch: dict) -> dict:
    """The counts FlopsModel needs, read off a model-ready batch."""
    if "cu_seqlens" in batch:  # packed: attention is per sample (the tail padding counts as done work)
        lengths = batch["cu_seqlens"].diff()
    else:
        lengths = batch["attention_mask"].sum(dim=1)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    positions = 0
    if batch.get("feature_attention_mask") is not None:
        frames = batch["feature_attention_mask"].sum(dim=1)
        positions = int(((frames - 1) // 2 + 1).sum())
    return {"tokens": int(lengths.sum()), "sum_sq_lengths": int((lengths.long() ** 2).sum()),
            "target_tokens": targets, "encoder_positions": positions}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    # ru_maxrss is KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_line(row: dict, max_steps: int) -> str:
    """`step 120/2000 | loss 1.234 (asr 1.1 sum 2.0) | lr 1e-3 | gnorm 0.5 | tok/s 11,940 | mfu 41.2% | ...`"""
    parts = [f"step {row['step']}/{max_steps}", f"loss {row['loss']:.4f}" + (" (update skipped)" if row.get("skipped") else "")]
    per_task = " ".join(f"{t} {v:.3f}" for t, v in row.get("loss_per_task", {}).items())
    if per_task:
        parts[-1] += f" ({per_task})"
    parts.append(f"lr {row['lr']:.2e}")
    parts.append(f"gnorm {row['grad_norm']:.3f}")
    parts.append(f"tok/s {row['tokens_per_sec']:,.0f}")
    parts.append(f"mfu {row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else "mfu n/a")
    parts.append(f"mem {row['mem_gib']:.2f} GiB")
    parts.append(f"data {row['data_wait_pct']:.1f}%")
    parts.append(f"stage {row['stage']}")
    if row.get("embedding_hit_rate") is not None:   # ADS: the share of samples with a stored aligner embedding
        parts.append(f"emb hit {row['embedding_hit_rate']:.0%}")
    parts.append(f"eta {format_duration(row.get('eta_s', float('nan')))}")
    return " | ".join(parts)


class MetricsWriter:
    """Rank 0 only: metrics.jsonl (one JSON per row), TensorBoard scalars."""

    def __init__(self, out_dir: Path, tensorboard: bool):
        self.path = Path(out_dir) / "metrics.jsonl"
        # Rows in the file, kept ones included: a checkpoint records it, and a resume cuts the
        # file back to it (rows written after the checkpoint are written again by the resumed run).
        self.rows = self._count_rows()
        self.file = open(self.path, "a", encoding="utf-8")  # O_APPEND: writes land at the end after a cut
        self.tensorboard = tensorboard
        self.tb_dir = Path(out_dir) / "tensorboard"
        self.tb = None  # opened at the first row, once a resume has set purge_after_step
        # A resumed run's step: TensorBoard hides the earlier runs' events after it (written
        # after the checkpoint, then written again by this run), as metrics.jsonl is cut back.
        self.purge_after_step: int | None = None

    @staticmethod
    def keep_rows_up_to(out_dir: Path, step: int) -> int:
        """Cut an existing metrics.jsonl back to the rows of steps <= `step` (the resumed
        checkpoint's; -1 for a fresh start), so that a resumed run's rows follow without
        duplicates. Rows are appended from there. Returns the number of rows removed."""
        path = Path(out_dir) / "metrics.jsonl"
        if not path.exists():
            return 0
        kept, removed = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row_step = json.loads(line).get("step", 0)
            except (ValueError, AttributeError):  # a line cut short by a crash mid-write
                row_step = None
            if isinstance(row_step, int) and row_step <= step:
                kept.append(line + "\n")
            else:
                removed += 1
        if removed:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            tmp.replace(path)
        return removed

    def _count_rows(self) -> int:
        if not self.path.exists():
            return 0
        return sum(1 for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip())

    def keep_first_rows(self, rows: int) -> None:
        """Cut the file back to its first `rows` rows: those a checkpoint had seen written."""
        if rows >= self.rows:
            return
        self.file.flush()
        size, kept = 0, 0
        with open(self.path, "rb") as handle:
            for line in handle:
                if kept == rows:
                    break
                size += len(line)
                kept += line.strip() != b""
        os.truncate(self.path, size)
        self.rows = rows

    def write(self, row: dict) -> None:
        row = finite_or_none(row)  # strict JSON: a skipped step's NaN loss is written as null
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()
        self.rows += 1
        if self.tensorboard and self.tb is None:
            self.tb = self._open_tensorboard()
        if self.tb:
            step = row.get("step", 0)
            for key, value in flatten_dict(row).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(key, value, step)

    def _open_tensorboard(self):
        """A SummaryWriter, or False when TensorBoard cannot be used (said once; training goes on)."""
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if self.purge_after_step is None else self.purge_after_step + 1
            return SummaryWriter(log_dir=str(self.tb_dir), purge_step=purge)
        except Exception as e:  # tensorboard missing or broken
            print(f"[omnitrain] TensorBoard disabled: {e}", flush=True)
            return False

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()


def finite_or_none(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


def flatten_dict(row: dict, sep: str = "/", prefix: str = "") -> dict:
    """Nested dicts as one level, keys joined by ``sep`` (TensorBoard tags: loss_per_task/asr)."""
    out = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_dict(v, sep, key + sep))
        else:
            out[key] = v
    return out


class LogWindow:
    """Sums over the steps since the previous metrics row: the row's loss and per-task losses are
    means over them (weighted by target tokens; non-finite, skipped steps left out), its tok/s,
    MFU and data wait are over their time."""

    def __init__(self):
        self.steps, self.tokens, self.slots = 0, 0, 0
        self.flops = self.data_s = self.step_s = 0.0
        self.loss_sum, self.targets = 0.0, 0
        self.per_task: dict[str, list[float]] = {}  # task -> [loss sum, target tokens]

    def state_dict(self) -> dict:
        return {**self.__dict__, "per_task": {task: list(sums) for task, sums in self.per_task.items()}}

    @classmethod
    def from_state(cls, state: dict) -> "LogWindow":
        window = cls()
        window.__dict__.update(state)
        window.per_task = {task: list(sums) for task, sums in state.get("per_task", {}).items()}
        return window

    def add(self, stats) -> None:
        """One training step (engine.trainer.StepStats)."""
        self.steps += 1
        self.tokens += stats.tokens
        self.slots += stats.slots
        self.flops += stats.flops
        self.data_s += stats.data_s
        self.step_s += stats.step_s
        if stats.skipped:
            return
        self.loss_sum += stats.loss * stats.targets
        self.targets += stats.targets
        for task, (total, count) in stats.per_task_sums.items():
            sums = self.per_task.setdefault(task, [0.0, 0.0])
            sums[0] += total
            sums[1] += count

    def losses(self) -> tuple[float, dict]:
        loss = self.loss_sum / self.targets if self.targets else float("nan")
        # In TASKS order whatever order the tasks first appeared in: log lines line up row to row.
        return loss, {task: self.per_task[task][0] / self.per_task[task][1] for task in TASKS
                      if self.per_task.get(task, (0.0, 0))[1]}
