"""The demo data is learnable by the tiny preset: a short CPU run beats the majority class on
DID and SER and brings the ASR loss well down.

One real training run (engine.runner.run_training, random recipe, tiny preset, frozen audio
encoder, LoRA on the LLM) on the generated demo set, then its last validation row:
- DID and SER: teacher-forced accuracy of the label's first token (``val_label_acc``) beats
  the best constant answer on the same validation examples (the majority rate, counted from
  the validation batches, not written down) by LABEL_ACC_MARGIN;
- ASR: the validation loss ends below ASR_LOSS_RATIO times its value for the untrained model
  (the same seeded init, LoRA B = 0, evaluated on the same batches before training).

Measured (2 cores, OMP_NUM_THREADS=1, 300 steps in ~85-100 s of training; majority rates
DID 0.72, SER 0.44): DID 0.97 / 0.88 / 0.94 and SER 0.93 / 0.85 / 0.67 for (seed, model.seed)
= (1234, 0) (this test), (1, 1), (2, 2); ASR val loss 6.4 -> 1.4-1.7. With the audio
encoder's default input init (before RANDOM_INIT_AUDIO_CONV_GAIN in engine/model.py) both
labels stayed at exactly the majority rate, which is the failure this test guards against.
"""
from __future__ import annotations

import json
from collections import Counter

import torch

from engine.config import load_config
from engine.model import build_model
from engine.runner import run_training
from engine.tokenizer import build_tiny_tokenizer
from loaders.demo_data import write_demo_shards
from loaders.val_batches import build_val_batches
from loaders.tasks import TASKS

# 300 steps take ~85 s of training on the 2-core CI machine (one thread); the label accuracy
# leaves the majority rate between steps 100 and 200 and ends at 0.67-0.97 (module docstring).
TRAIN_STEPS = 300
# The recipes' 1e-2 is too high for this: at the default audio init the run learned the label
# prior only, at RANDOM_INIT_AUDIO_CONV_GAIN = 4 it stalls at loss ~3.5 with accuracy 0.
LEARNING_RATE = 3e-3
# The default demo set has 32 DID and 27 SER validation examples: beating the majority rate
# by 0.10 takes at least 4 more DID and 3 more SER answers right than the majority label gets.
LABEL_ACC_MARGIN = 0.10
# "Well below its start": the untrained model's ASR val loss is 6.4 (ln of the 384-row
# vocabulary is 5.95); trained runs end at 1.4-1.7.
ASR_LOSS_RATIO = 0.7
IGNORE_INDEX = -100


def run_settings(out, demo_dir) -> list[str]:
    return [f"output_dir={out}", f"data.demo_dir={demo_dir}", f"max_steps={TRAIN_STEPS}", f"optim.lr={LEARNING_RATE}",
            "lora.dropout=0", "checkpoint.every=0", "eval.every=0", "eval.max_samples=4", "eval.max_new_tokens=8",
            "metrics.progress_bar=false", "metrics.tensorboard=false", "metrics.log_every=40"]


def first_target_tokens(batches: list[dict], task: str) -> list[int]:
    """The first answer token of every validation example of a task (what val_label_acc scores)."""
    tokens = []
    for batch in batches:
        for row, row_task in enumerate(batch["tasks"]):
            if row_task == task:
                answer = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten()
                tokens.append(int(batch["labels"][row, answer[0]]))
    return tokens


def majority_rate(tokens: list[int]) -> float:
    return Counter(tokens).most_common(1)[0][1] / len(tokens)


@torch.no_grad()
def untrained_val_loss(cfg, tokenizer, batches: list[dict], task: str) -> float:
    """Per-token validation loss of the run's model before its first step (same seeded init)."""
    model = build_model(cfg.model, cfg.lora, cfg.loss, tokenizer, torch.device("cpu")).eval()
    index = TASKS.index(task)
    loss_sum, count = 0.0, 0
    for batch in batches:
        out = model(batch)
        loss_sum += float(out["per_task_loss_sum"][index])
        count += int(out["per_task_count"][index])
    return loss_sum / count


def test_tiny_preset_learns_the_demo_tasks(tmp_path):
    demo_dir = tmp_path / "demo"
    write_demo_shards(demo_dir)
    cfg = load_config("random", run_settings(tmp_path / "run", demo_dir))
    tokenizer = build_tiny_tokenizer()
    val_batches = build_val_batches(cfg.data, tokenizer, rank=0, world_size=1)
    majority = {task: majority_rate(first_target_tokens(val_batches, task)) for task in ("did", "ser")}
    asr_loss_start = untrained_val_loss(cfg, tokenizer, val_batches, "asr")

    run_training(cfg)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if row.get("event") == "eval"]
    assert evals and evals[-1]["step"] == TRAIN_STEPS, f"no validation at the last step; eval rows: {evals}"
    final = evals[-1]
    report = (f"majority {majority}, label acc {final['val_label_acc']}, "
              f"asr val loss {asr_loss_start:.3f} -> {final['val_loss']['asr']:.3f}")
    print(report)
    for task in ("did", "ser"):
        assert final["val_label_acc"][task] > majority[task] + LABEL_ACC_MARGIN, f"{task} not learned: {report}"
    assert final["val_loss"]["asr"] < ASR_LOSS_RATIO * asr_loss_start, f"asr loss did not fall: {report}"
