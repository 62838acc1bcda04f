"""Greedy generation of validation answers, in lockstep over ranks (engine.validation's Validator
runs it during training, engine.evaluate --run after it).

- Collectives that are no-ops without a process group: ``all_gather_objects``,
  ``any_rank_true``, ``max_over_ranks``.
- Samples: ``split_batch_rows`` cuts loader batch rows into ``GenerationSample``s (prompt,
  audio, reference); ``select_for_generation`` picks which of the whole validation set are
  generated for (the same choice on any world size); ``generation_batches`` / ``collate_prompts``
  pack the chosen ones into prompt batches within the token budget.
- Decoding: ``greedy_decode`` grows each row token by token until every rank's rows have
  finished (the lockstep rule is in engine.validation's docstring); ``stop_token_ids`` and
  ``banned_token_ids`` say which tokens end a reply and which it may never contain.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.tokenizer import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, IM_END, PAD_TOKEN
from engine.trainer import to_device
from loaders.tasks import TASKS

IGNORE_INDEX = -100  # label value of tokens outside the answer (loaders.prompts)
# Generation stops at the end of the assistant turn. <|endoftext|> also ends a reply in
# Qwen2.5-Omni's generation_config.json (eos_token_id [151645, 151643]).
STOP_TOKENS = (IM_END, PAD_TOKEN)
# Input-only tokens the model must never emit: an <|AUDIO|> placeholder in the growing
# sequence would have no audio features behind it and stop the next forward.
BANNED_TOKENS = (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)


# --- collectives (no-ops without a process group) -----------------------------------------

def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not _distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank_true(flag: bool, device: torch.device) -> bool:
    value = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    if _distributed():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def max_over_ranks(value: int, device: torch.device) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


# --- samples for generation ---------------------------------------------------------------

@dataclass
class GenerationSample:
    """One validation example cut into what generation needs: the prompt, its audio, the reference."""

    task: str
    key: str
    prompt_ids: torch.Tensor  # [P] long: everything up to the first answer token
    features: torch.Tensor  # [128, F] log-mel frames of the clip (unpadded)
    reference: str
    order: int = -1  # place in the global selection order (equal on every world size)


def split_batch_rows(batch: dict, tokenizer, rows: list[int] | None = None) -> list[GenerationSample]:
    """Rows of a loader batch (all by default) as GenerationSamples. The prompt of a row is its
    tokens up to the first label != -100; the reference is the label tokens without the
    closing <|im_end|>."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    samples = []
    for row in range(batch["input_ids"].shape[0]) if rows is None else rows:
        labels = batch["labels"][row]
        answer = (labels != IGNORE_INDEX).nonzero().flatten()
        if answer.numel() == 0:
            raise ValueError(f"validation sample {batch['keys'][row]} ({batch['tasks'][row]}) has no answer "
                             "tokens (every label is -100); the loader must label the assistant response")
        target = labels[answer].tolist()
        if target and target[-1] == im_end:
            target = target[:-1]
        frames = int(batch["feature_attention_mask"][row].sum())
        samples.append(GenerationSample(
            task=batch["tasks"][row], key=batch["keys"][row],
            prompt_ids=batch["input_ids"][row, :int(answer[0])].clone(),
            features=batch["input_features"][row, :, :frames].clone(),
            reference=tokenizer.decode(target)))
    return samples


def _selection_rank(task: str, key: str) -> int:
    # A hash, not the key itself: keys sort in shard order, so taking the first few by key
    # would draw every sample from the first shard (and put all the decoding on one rank).
    return zlib.crc32(f"{task}/{key}".encode("utf-8"))


def select_for_generation(candidates_by_rank: list[list[tuple[str, str]]], max_samples: int) -> list[dict]:
    """Which samples to generate for: {(rank, index): order} as a list per rank.

    Tasks take turns (asr, sum, did, ser, asr, ...), each in a fixed hashed order of its
    (task, key) pairs, until ``max_samples`` are taken; the choice depends only on the set of
    samples, not on how the shards are split across ranks.
    """
    by_task: dict[str, list] = {task: [] for task in TASKS}
    for rank, candidates in enumerate(candidates_by_rank):
        for index, (task, key) in enumerate(candidates):
            by_task[task].append((_selection_rank(task, key), key, rank, index))
    queues = [sorted(entries) for entries in by_task.values() if entries]
    chosen: list[dict] = [{} for _ in candidates_by_rank]
    order, depth = 0, 0
    while order < max_samples and any(depth < len(queue) for queue in queues):
        for queue in queues:
            if depth < len(queue) and order < max_samples:
                _, _, rank, index = queue[depth]
                chosen[rank][index] = order
                order += 1
        depth += 1
    return chosen


def generation_batches(samples: list[GenerationSample], budget: int, max_new_tokens: int,
                       pad_id: int) -> list[dict]:
    """Samples sorted by prompt length, packed so that batch x (prompt + new tokens) fits the
    token budget (data.max_tokens_per_batch); at least one sample per batch."""
    samples = sorted(samples, key=lambda s: (len(s.prompt_ids), s.order))
    groups, current = [], []
    for sample in samples:
        if current and (len(current) + 1) * (len(sample.prompt_ids) + max_new_tokens) > budget:
            groups.append(current)
            current = []
        current.append(sample)
    if current:
        groups.append(current)
    return [collate_prompts(group, pad_id) for group in groups]


def collate_prompts(samples: list[GenerationSample], pad_id: int) -> dict:
    """Right-padded prompts and their audio, in the loader's batch format (no labels)."""
    width = max(len(s.prompt_ids) for s in samples)
    frames = max(s.features.shape[1] for s in samples)
    n_mels = samples[0].features.shape[0]
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    features = torch.zeros((len(samples), n_mels, frames), dtype=torch.float32)
    feature_mask = torch.zeros((len(samples), frames), dtype=torch.long)
    for row, sample in enumerate(samples):
        n, f = len(sample.prompt_ids), sample.features.shape[1]
        input_ids[row, :n] = sample.prompt_ids
        attention[row, :n] = 1
        features[row, :, :f] = sample.features
        feature_mask[row, :f] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "input_features": features,
            "feature_attention_mask": feature_mask, "samples": samples}


# --- greedy decoding ----------------------------------------------------------------------

def greedy_decode(model, batch: dict, *, max_new_tokens: int, stop_ids: set[int], banned_ids: list[int],
                  device: torch.device, dummy: bool = False) -> list[list[int]]:
    """Generated token ids per row (stop token excluded), in lockstep with the other ranks.

    No KV cache: each step recomputes the forward over the whole growing sequence. That keeps
    decoding on the one forward path FSDP wraps (model(batch, mode=...)), and for the tiny
    model and a bounded max_new_tokens (eval.max_new_tokens) the extra compute is small.
    The audio features stay as they are; only the text grows. A dummy batch starts with every
    row finished: it only keeps this rank in step while other ranks still decode.
    """
    rows = batch["input_ids"].shape[0]
    lengths = batch["attention_mask"].sum(dim=1)
    ids = torch.full((rows, batch["input_ids"].shape[1] + max_new_tokens), 0, dtype=torch.long)
    ids[:, :batch["input_ids"].shape[1]] = batch["input_ids"]
    finished = [dummy] * rows
    generated: list[list[int]] = [[] for _ in range(rows)]
    audio = to_device({k: batch[k] for k in ("input_features", "feature_attention_mask")}, device)
    for _ in range(max_new_tokens):
        # Every rank takes part in this all-reduce each step, so all leave the loop together.
        if not any_rank_true(not all(finished), device):
            break
        width = int(lengths.max())
        positions = torch.arange(width)
        step_batch = {"input_ids": ids[:, :width], "attention_mask": (positions < lengths[:, None]).long()}
        logits = model({**to_device(step_batch, device), **audio}, mode="next_token_logits")
        if banned_ids:
            logits[:, banned_ids] = float("-inf")
        next_ids = logits.argmax(dim=-1).tolist()
        for row in range(rows):
            if finished[row]:
                continue
            if next_ids[row] in stop_ids:
                finished[row] = True
                continue
            generated[row].append(next_ids[row])
            ids[row, lengths[row]] = next_ids[row]
            lengths[row] += 1
    return generated


def banned_token_ids(tokenizer, vocab_rows: int) -> list[int]:
    """Input-only special tokens, and the embedding rows past the tokenizer (padding rows of
    the vocabulary, which no tokenizer id names)."""
    banned = {tokenizer.convert_tokens_to_ids(token) for token in BANNED_TOKENS}
    banned.update(range(len(tokenizer), vocab_rows))
    return sorted(i for i in banned if i is not None and 0 <= i < vocab_rows)


def stop_token_ids(tokenizer) -> set[int]:
    ids = {tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS}
    return {i for i in ids if i is not None and i != tokenizer.unk_token_id}
