"""Padding-free packing: several examples in one row, each attending only to itself.

A padded micro-batch costs ``B x longest`` token slots; a packed row costs the sum of the
lengths. ``pack_examples`` groups examples into rows of at most ``max_tokens`` tokens
(first-fit decreasing by length); ``collate_packed`` turns one group into the packed batch
dict the engine reads:

    input_ids        [1, T] long   the examples one after another, no padding
    labels           [1, T] long   each example's own labels; the first token of every example
                                   is -100, so no example is trained to follow the one before it
    attention_mask   [1, T] long   ones (zeros on a ``pad_to_multiple_of`` tail). Bookkeeping
                                   only: the model must call the LLM with attention_mask=None,
                                   because transformers builds the per-sample (block-diagonal)
                                   causal mask from the position ids only when no 2-D mask is
                                   given (masking_utils._preprocess_mask_arguments).
    position_ids     [4, 1, T] long  row 0: text positions restarting at 0 for each example (what
                                   transformers reads to find the sample boundaries); rows 1-3:
                                   each example's own M-RoPE positions. For audio + text input the
                                   thinker's rope index advances every axis by one per token
                                   (audio placeholders included), so rows 1-3 equal row 0.
    cu_seqlens       [n + 1] int32 sample boundaries (flash-attn / torch varlen convention)
    max_seqlen       int           longest sample
    task_ids         [n] long      one task id per example (TASKS order)
    token_task_ids   [1, T] long   the task id of the example each token belongs to (-1 on the
                                   tail padding): per-task loss sums need one task per token row
    input_features   [n, 128, F]   per example, padded to the longest clip (as in ``collate``)
    feature_attention_mask [n, F]
    keys, tasks, num_tokens        as in ``collate``; num_tokens counts real tokens only

``packing_efficiency`` (real tokens / token slots) reads padded and packed batches alike.
"""
from __future__ import annotations

import numpy as np
import torch

from loaders.prompts import IGNORE_INDEX
from loaders.tasks import TASK_IDS

# Task id written on tokens that belong to no example (the tail of a row padded to a multiple).
NO_TASK = -1
# select_packed_row fills a row in the sampler's draw order up to this share of the budget, then
# longest first. Measured on 4-budget queues of two equally drawn tasks, one with examples up to
# half as long (lengths 150-260 of a 2048 budget): longest first from the start gave the shorter
# task ~11% of a row's examples at a fill of 0.968; draw order to 80% gives it ~46% at 0.972
# (lengths 200-1000 of 4096, as at 7B: 0.988 vs 0.987). Examples near the budget's size fill
# worse in draw order (lengths 50-3000 of 4096: 0.90 vs 0.95).
DRAW_ORDER_FILL = 0.8
# M-RoPE rows of the position tensor (temporal, height, width), after the text row.
MROPE_AXES = 3


class PackingError(ValueError):
    """An example that cannot be packed (longer than a whole row)."""


def pack_examples(examples, max_tokens: int) -> list[list]:
    """Group examples into rows of at most ``max_tokens`` tokens, first-fit decreasing by length.

    Every example lands in exactly one row (nothing is dropped); rows are returned in the order
    they were opened, each holding its examples longest first. Ties in length keep the input
    order, so the result is deterministic.
    """
    if max_tokens <= 0:
        raise PackingError(f"max_tokens={max_tokens}: a packed row needs room for at least one token "
                           "(set data.max_tokens_per_batch > 0)")
    order = sorted(range(len(examples)), key=lambda i: (-examples[i].num_tokens, i))
    rows: list[list] = []
    free: list[int] = []
    for i in order:
        example = examples[i]
        n = example.num_tokens
        if n > max_tokens:
            raise PackingError(f"example {example.key} (shard {getattr(example, 'shard', '?')}) has {n} tokens, more than "
                               f"a packed row holds ({max_tokens}); raise data.max_tokens_per_batch or drop the sample "
                               "before packing (the stream counts such samples as too_long_for_batch)")
        for row, room in enumerate(free):
            if n <= room:
                rows[row].append(example)
                free[row] -= n
                break
        else:
            rows.append([example])
            free.append(max_tokens - n)
    return rows


def select_packed_row(lengths: list[int], budget: int) -> list[int]:
    """Indices (into ``lengths``, oldest first) of one packed row from a waiting queue: the oldest
    examples in draw order wherever they fit, until the row is ``DRAW_ORDER_FILL`` full, then the
    rest longest first wherever they still fit. The packed counterpart of
    batching.select_micro_batch, for the stream's lookahead queue.

    Index 0 always goes, so none waits forever. Draw order keeps the row's task mix the sampler's
    (longest first from the whole queue favours the task with the longer examples: the shorter task
    of a new stage waited several steps); longest first only closes the row's last gap."""
    if not lengths:
        raise PackingError("select_packed_row got an empty queue")
    if lengths[0] > budget:
        raise PackingError(f"the oldest waiting example has {lengths[0]} tokens, more than a packed row holds "
                           f"({budget}); raise data.max_tokens_per_batch")
    chosen, room = [0], budget - lengths[0]
    draw_order_room = budget * (1 - DRAW_ORDER_FILL)
    for i in range(1, len(lengths)):
        if room <= draw_order_room:
            break
        if lengths[i] <= room:
            chosen.append(i)
            room -= lengths[i]
    taken = set(chosen)
    for i in sorted((i for i in range(1, len(lengths)) if i not in taken), key=lambda i: (-lengths[i], i)):
        if lengths[i] <= room:
            chosen.append(i)
            room -= lengths[i]
    return sorted(chosen)


def collate_packed(examples, pad_token_id: int, pad_to_multiple_of: int = 1) -> dict:
    """One packed row of ``examples`` (see the module docstring for the fields).

    ``pad_to_multiple_of`` > 1 pads the row's tail with ``pad_token_id`` up to a multiple of it
    (fixed shapes for compiled graphs); the tail is a segment of its own in ``cu_seqlens`` and
    ``position_ids``, so no example attends to it, and it carries no labels.
    """
    if not examples:
        raise PackingError("collate_packed got no examples; pack_examples never makes an empty row")
    if pad_to_multiple_of < 1:
        raise PackingError(f"pad_to_multiple_of={pad_to_multiple_of}; use 1 (no padding) or more")
    lengths = [e.num_tokens for e in examples]
    real = sum(lengths)
    total = -(-real // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full(total, pad_token_id, dtype=np.int64)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(total, dtype=np.int64)
    token_tasks = np.full(total, NO_TASK, dtype=np.int64)
    start = 0
    for example, n in zip(examples, lengths):
        input_ids[start:start + n] = example.input_ids
        labels[start:start + n] = example.labels
        labels[start] = IGNORE_INDEX  # never trained to follow the previous example
        positions[start:start + n] = np.arange(n)
        token_tasks[start:start + n] = TASK_IDS[example.task]
        start += n
    segments = list(lengths) + ([total - real] if total > real else [])
    positions[real:] = np.arange(total - real)
    cu_seqlens = np.concatenate([[0], np.cumsum(segments)]).astype(np.int32)
    attention = np.zeros(total, dtype=np.int64)
    attention[:real] = 1
    features, feature_mask = _stack_features(examples)
    text_positions = torch.from_numpy(positions)[None, None, :]
    return {
        "input_ids": torch.from_numpy(input_ids)[None],
        "labels": torch.from_numpy(labels)[None],
        "attention_mask": torch.from_numpy(attention)[None],
        "position_ids": text_positions.expand(1 + MROPE_AXES, 1, total).contiguous(),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "max_seqlen": int(max(segments)),
        "task_ids": torch.tensor([TASK_IDS[e.task] for e in examples], dtype=torch.long),
        "token_task_ids": torch.from_numpy(token_tasks)[None],
        "input_features": features,
        "feature_attention_mask": feature_mask,
        "keys": [e.key for e in examples],
        "tasks": [e.task for e in examples],
        "num_tokens": int(real),
    }


def _stack_features(examples) -> tuple[torch.Tensor, torch.Tensor]:
    max_frames = max(e.features.shape[1] for e in examples)
    n_mels = examples[0].features.shape[0]
    features = np.zeros((len(examples), n_mels, max_frames), dtype=np.float32)
    mask = np.zeros((len(examples), max_frames), dtype=np.int64)
    for row, example in enumerate(examples):
        frames = example.features.shape[1]
        features[row, :, :frames] = example.features
        mask[row, :frames] = 1
    return torch.from_numpy(features), torch.from_numpy(mask)


def token_slots(batch: dict) -> int:
    """Token positions the model computes for a batch: B x T, padded or packed."""
    return int(batch["input_ids"].numel())


def packing_efficiency(batches) -> float:
    """Real tokens / token slots over ``batches`` (padded or packed): 1.0 means no padding.

    A packed row without tail padding scores 1.0 by construction; how full the rows are is
    ``budget_fill``.
    """
    slots = sum(token_slots(b) for b in batches)
    if slots == 0:
        raise ValueError("packing_efficiency needs at least one non-empty batch")
    return sum(int(b["num_tokens"]) for b in batches) / slots


def budget_fill(batches, max_tokens: int) -> float:
    """Real tokens / (batches x max_tokens): how much of each micro-batch's token budget
    (data.max_tokens_per_batch) carries real tokens, padded or packed. Steps are sized by the
    budget, so this is the share of a step's capacity that trains."""
    if not batches or max_tokens <= 0:
        raise ValueError("budget_fill needs at least one batch and max_tokens > 0")
    return sum(int(b["num_tokens"]) for b in batches) / (len(batches) * max_tokens)
