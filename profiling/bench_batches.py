"""The micro-batches profiling/bench_train.py replays: collected once, padded and packed from the same samples.

    steps = collect_demo_steps(cfg, n_steps, micro_per_step)               # tiny: TrainStream, demo shards
    steps = collect_synthetic_steps(n_steps, micro_per_step, 4096, seed)   # 7b: real shapes, synthetic
    packed = pack_steps(steps, budget, world_size, pad_token_id)           # the same samples, packed rows

A step is the list of global micro-batches of one optimizer step; rank r takes micro-batches
r, r+W, ... (``rank_share``). The padded micro-batches come first (the loader's own bucketing
for the tiny preset); ``pack_steps`` takes the samples back out of each rank's share of a step
and packs them first-fit decreasing into rows of at most the same budget
(data.max_tokens_per_batch) with loaders.packing.collate_packed. So padded and packed runs see
exactly the same samples in the same steps, in the same step order: the same real tokens, the
same targets per optimizer step, and the same FLOPs of useful work.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# 7b synthetic batches: clip lengths of real speech tasks and Qwen-tokenizer-sized text around them.
CLIP_SECONDS = (5.0, 30.0)
MEL_FRAMES_PER_SECOND = 100  # WhisperFeatureExtractor hop 160 at 16 kHz
PROMPT_TOKENS = 40  # system + instruction around the audio, in Qwen tokens
TARGET_TOKENS = {"asr": (40, 160), "sum": (30, 80), "did": (2, 4), "ser": (2, 4)}
# Random text ids stay below Qwen's special/vision ids (151643+) so no id is read as an image.
TEXT_ID_RANGE = (300, 151000)


# ----------------------------------------------------------------------------- padded batches
def collect_demo_steps(cfg, n_steps: int, micro_per_step: int) -> list[list[dict]]:
    """Global padded micro-batches per step from the real loader (one stream, dealt to ranks later)."""
    from engine.tokenizer import build_tiny_tokenizer
    from loaders.pipeline import TrainStream

    if cfg.data.packing:
        raise ValueError("bench_train collects padded micro-batches and packs them itself: drop the "
                         "data.packing=true override and use --packing on|both")
    stream = TrainStream(cfg.data, build_tiny_tokenizer(), rank=0, world_size=1, grad_accum=micro_per_step, seed=cfg.seed)
    try:
        return [stream.next_step() for _ in range(n_steps)]
    finally:
        stream.close()


def synthetic_micro_batch(tokenizer, gen: torch.Generator, budget: int, task: str) -> dict:
    """One padded micro-batch of same-task samples of similar length within `budget` slots."""
    from engine.tokenizer import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, IM_END, IM_START
    from loaders.tasks import TASK_IDS

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS, IM_START, IM_END)}
    lo, hi = CLIP_SECONDS
    seconds = lo + (hi - lo) * float(torch.rand(1, generator=gen))

    def rand_ids(n: int) -> list[int]:
        return torch.randint(*TEXT_ID_RANGE, (n,), generator=gen).tolist()

    samples = []
    while True:
        frames = int(seconds * MEL_FRAMES_PER_SECOND * (0.85 + 0.15 * float(torch.rand(1, generator=gen))))
        a = (frames - 1) // 2 + 1
        n_audio = (a - 2) // 2 + 1  # the model's own formula (BRIEF: audio tokens)
        t_lo, t_hi = TARGET_TOKENS[task]
        target = rand_ids(int(torch.randint(t_lo, t_hi + 1, (1,), generator=gen))) + [ids[IM_END]]
        head = [ids[IM_START]] + rand_ids(PROMPT_TOKENS // 2) + [ids[AUDIO_BOS]]
        tail = [ids[AUDIO_EOS]] + rand_ids(PROMPT_TOKENS // 2) + [ids[IM_END], ids[IM_START]] + rand_ids(2)
        prompt = head + [ids[AUDIO_TOKEN]] * n_audio + tail
        sample = (prompt + target, [-100] * len(prompt) + target, frames)
        longest = max([len(s[0]) for s in samples] + [len(sample[0])])
        if samples and (len(samples) + 1) * longest > budget:
            break
        samples.append(sample)
        if len(sample[0]) > budget:
            raise ValueError(f"a {seconds:.0f} s synthetic sample ({len(sample[0])} tokens) exceeds the {budget}-token "
                             "micro-batch budget; raise --budget")
    B, T, F = len(samples), max(len(s[0]) for s in samples), max(s[2] for s in samples)
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "attention_mask": torch.zeros(B, T, dtype=torch.long),
             "labels": torch.full((B, T), -100, dtype=torch.long),
             "task_ids": torch.full((B,), TASK_IDS[task], dtype=torch.long),
             "input_features": torch.zeros(B, 128, F), "feature_attention_mask": torch.zeros(B, F, dtype=torch.long)}
    for i, (seq, labels, frames) in enumerate(samples):
        batch["input_ids"][i, :len(seq)] = torch.tensor(seq)
        batch["attention_mask"][i, :len(seq)] = 1
        batch["labels"][i, :len(seq)] = torch.tensor(labels)
        batch["input_features"][i, :, :frames] = torch.randn(128, frames, generator=gen)
        batch["feature_attention_mask"][i, :frames] = 1
    batch.update(num_tokens=int(batch["attention_mask"].sum()), keys=[f"synthetic-{i}" for i in range(B)], tasks=[task] * B)
    return batch


def collect_synthetic_steps(n_steps: int, micro_per_step: int, budget: int, seed: int) -> list[list[dict]]:
    from engine.tokenizer import build_tiny_tokenizer
    from loaders.tasks import TASKS

    tokenizer, gen = build_tiny_tokenizer(), torch.Generator().manual_seed(seed)
    steps, k = [], 0
    for _ in range(n_steps):
        step = []
        for _ in range(micro_per_step):
            step.append(synthetic_micro_batch(tokenizer, gen, budget, TASKS[k % len(TASKS)]))
            k += 1
        steps.append(step)
    return steps


def rank_share(steps: list[list[dict]], rank: int, world_size: int) -> list[list[dict]]:
    """Rank r takes micro-batches r, r+W, ... of each step (HF's accelerate shards a sequential
    dataset of the flattened steps the same way)."""
    return [step[rank::world_size] for step in steps]


# ----------------------------------------------------------------------------- packed rows
@dataclass
class BenchSample:
    """One sample taken back out of a padded micro-batch: what loaders.packing.collate_packed reads."""
    key: str
    task: str
    input_ids: np.ndarray   # [n] int64, no padding
    labels: np.ndarray      # [n] int64
    features: np.ndarray    # [128, frames] float32, the clip's own frames
    num_tokens: int


def unpad_samples(batch: dict) -> list[BenchSample]:
    """The samples of a right-padded micro-batch (loaders.batching.collate's layout), in row order."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    frames = batch["feature_attention_mask"].sum(dim=1).tolist()
    samples = []
    for row, (n, f) in enumerate(zip(lengths, frames)):
        samples.append(BenchSample(key=batch["keys"][row], task=batch["tasks"][row],
                                   input_ids=batch["input_ids"][row, :n].numpy(),
                                   labels=batch["labels"][row, :n].numpy(),
                                   features=batch["input_features"][row, :, :f].numpy(), num_tokens=int(n)))
    return samples


def pack_steps(steps: list[list[dict]], budget: int, world_size: int, pad_token_id: int) -> list[list[dict]]:
    """Each step's samples as packed rows of at most `budget` tokens, rank share by rank share.

    Rank r's samples of a step (from its padded micro-batches r, r+W, ...) are packed first-fit
    decreasing (loaders.packing.pack_examples): never more rows than it had padded micro-batches,
    fewer where those left room. Every rank must run the same number of forward passes per step
    (FSDP gathers per forward), so a step whose ranks would get different row counts keeps one
    row per padded micro-batch. Rows are dealt back so that rank_share gives rank r its own rows.
    """
    from loaders.packing import collate_packed, pack_examples

    packed = []
    for step in steps:
        shares = [[s for batch in step[rank::world_size] for s in unpad_samples(batch)] for rank in range(world_size)]
        rows = [pack_examples(share, budget) for share in shares]
        if len({len(r) for r in rows}) > 1:
            rows = [[unpad_samples(batch) for batch in step[rank::world_size]] for rank in range(world_size)]
        packed.append([collate_packed(rows[rank][i], pad_token_id)
                       for i in range(len(rows[0])) for rank in range(world_size)])
    return packed


def token_counts(steps: list[list[dict]]) -> dict:
    """Real tokens, token slots (B x T per micro-batch), micro-batches and packing efficiency of `steps`."""
    from loaders.packing import packing_efficiency, token_slots

    batches = [mb for step in steps for mb in step]
    return {"real_tokens": sum(int(mb["num_tokens"]) for mb in batches),
            "token_slots": sum(token_slots(mb) for mb in batches), "micro_batches": len(batches),
            "packing_efficiency": packing_efficiency(batches)}


def step_flops(cfg, steps: list[list[dict]]) -> list[float]:
    """FLOPs of each step with engine.metrics' formula, from a meta-device build of our model.
    Padded and packed steps of the same samples give the same FLOPs (per-sample attention)."""
    from engine.metrics import batch_flops_inputs, flops_model_of
    from engine.model import build_model
    from engine.tokenizer import build_tiny_tokenizer

    model = build_model(cfg.model, cfg.lora, cfg.loss, build_tiny_tokenizer(), torch.device("meta"))
    flops = flops_model_of(model)
    return [sum(flops.step_flops(**batch_flops_inputs(mb)) for mb in step) for step in steps]
