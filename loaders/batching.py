"""Examples -> token-budget micro-batches (bucketed by length) -> the model-ready batch dict.

A micro-batch costs its padded slots: batch size x longest sequence, at most
``max_tokens_per_batch``. Bucketing: each micro-batch starts from the oldest waiting example
(so none waits forever) and adds the waiting examples whose length is closest to it while
the padded cost fits. The pipeline keeps a lookahead of waiting examples
(``LOOKAHEAD_BATCHES`` micro-batches' worth) so there are neighbours to choose from.
"""
from __future__ import annotations

import numpy as np
import torch

from loaders.prompts import IGNORE_INDEX, shortest_example_tokens
from loaders.shards import ShardError
from loaders.tasks import TASK_IDS

# Tasks with a closed label set and the DataConfig field holding it (as loaders.shards.LABELLED_TASKS).
_LABEL_SETTINGS = {"did": "dialects", "ser": "emotions"}

# Waiting examples kept per micro-batch, in tokens: 4 x max_tokens_per_batch. More gives
# tighter buckets (less padding) but holds more decoded audio in memory.
LOOKAHEAD_BATCHES = 4


class BatchBudgetError(ShardError):
    """data.max_tokens_per_batch too small for any example of an active task. The same condition
    a stream reports (ShardError) once every example it read was skipped as too_long_for_batch,
    found up front; a ShardError so that the engine's CLI prints it as a one-line user error."""


def padded_cost(lengths: list[int]) -> int:
    return len(lengths) * max(lengths) if lengths else 0


def check_budget_fits_tasks(cfg, tokenizer, tasks) -> None:
    """Fail at once when data.max_tokens_per_batch cannot hold even the shortest possible
    example of a task (one audio token, the shortest target): every example would be skipped
    as too_long_for_batch. Raises BatchBudgetError naming the setting and the value it needs."""
    for task in tasks:
        labels = getattr(cfg, _LABEL_SETTINGS[task]) if task in _LABEL_SETTINGS else ()
        shortest = shortest_example_tokens(tokenizer, task, cfg.instruction_lang, labels)
        if cfg.max_tokens_per_batch < shortest:
            raise BatchBudgetError(
                f"data.max_tokens_per_batch={cfg.max_tokens_per_batch} cannot hold one {task} example: the prompt "
                f"of the shortest possible one (one audio token) has {shortest} tokens, and real recordings add "
                f"about 25 per second; raise data.max_tokens_per_batch well above {shortest} or drop {task} from "
                "the mix")


def select_micro_batch(lengths: list[int], budget: int) -> list[int]:
    """Indices (into ``lengths``, oldest first) of one micro-batch: index 0 plus its nearest
    neighbours in length, as many as fit in ``budget`` padded slots."""
    seed_length = lengths[0]
    order = sorted(range(1, len(lengths)), key=lambda i: (abs(lengths[i] - seed_length), i))
    chosen, longest = [0], seed_length
    for i in order:
        new_longest = max(longest, lengths[i])
        if (len(chosen) + 1) * new_longest <= budget:
            chosen.append(i)
            longest = new_longest
    return sorted(chosen)


def collate(examples, pad_token_id: int) -> dict:
    """The batch format of the engine (see BRIEF: input_ids, attention_mask, labels, task_ids,
    input_features [B, 128, F], feature_attention_mask [B, F], keys, tasks, num_tokens)."""
    batch_size = len(examples)
    max_len = max(e.num_tokens for e in examples)
    max_frames = max(e.features.shape[1] for e in examples)
    n_mels = examples[0].features.shape[0]
    input_ids = np.full((batch_size, max_len), pad_token_id, dtype=np.int64)
    labels = np.full((batch_size, max_len), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((batch_size, max_len), dtype=np.int64)
    features = np.zeros((batch_size, n_mels, max_frames), dtype=np.float32)
    feature_mask = np.zeros((batch_size, max_frames), dtype=np.int64)
    for row, example in enumerate(examples):
        n, frames = example.num_tokens, example.features.shape[1]
        input_ids[row, :n] = example.input_ids
        labels[row, :n] = example.labels
        attention[row, :n] = 1
        features[row, :, :frames] = example.features
        feature_mask[row, :frames] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(labels),
        "task_ids": torch.tensor([TASK_IDS[e.task] for e in examples], dtype=torch.long),
        "input_features": torch.from_numpy(features),
        "feature_attention_mask": torch.from_numpy(feature_mask),
        "keys": [e.key for e in examples],
        "tasks": [e.task for e in examples],
        "num_tokens": int(attention.sum()),
    }
