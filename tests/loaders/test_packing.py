"""loaders/packing.py: first-fit-decreasing rows, the packed batch format, packing efficiency.

Real examples come from the demo shards (decoded audio, real prompts), taken out of the
padded validation batches row by row.
"""
import numpy as np
import pytest
import torch

from engine.tokenizer import build_tiny_tokenizer
from loaders.config import DataConfig
from loaders.demo_data import write_demo_shards
from loaders.batching import LOOKAHEAD_BATCHES
from loaders.packing import (NO_TASK, PackingError, budget_fill, collate_packed, pack_examples, packing_efficiency,
                             select_packed_row)
from loaders.val_batches import build_val_batches
from loaders.prompts import IGNORE_INDEX
from loaders.stream import Example
from loaders.tasks import TASK_IDS


def examples_of(batch: dict) -> list[Example]:
    """The examples of a padded batch, unpadded again (tokens and audio frames)."""
    out = []
    for row, (key, task) in enumerate(zip(batch["keys"], batch["tasks"])):
        n = int(batch["attention_mask"][row].sum())
        frames = int(batch["feature_attention_mask"][row].sum())
        out.append(Example(key=key, shard="val-000000.tar", task=task, label=None, epoch=0,
                           input_ids=batch["input_ids"][row, :n].numpy(), labels=batch["labels"][row, :n].numpy(),
                           features=batch["input_features"][row, :, :frames].numpy(), audio_seconds=frames / 100))
    return out


def fake_example(key: str, n: int, task: str = "asr") -> Example:
    rng = np.random.default_rng(n)
    return Example(key=key, shard="s.tar", task=task, label=None, epoch=0,
                   input_ids=rng.integers(5, 90, n), labels=rng.integers(5, 90, n),
                   features=rng.standard_normal((128, 3 * n)).astype(np.float32), audio_seconds=0.1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def demo_batches(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("packing-demo")
    write_demo_shards(str(folder), train_shards=1, val_shards=1, samples_per_shard=12)
    cfg = DataConfig(train=[str(folder / "train-000000.tar")], val=[str(folder / "val-000000.tar")])
    return build_val_batches(cfg, tokenizer, rank=0, world_size=1), cfg


def test_first_fit_decreasing_fills_rows_as_worked_out_by_hand():
    examples = [fake_example(f"k{i}", n) for i, n in enumerate([2, 7, 3, 5, 2, 4])]
    rows = pack_examples(examples, max_tokens=10)
    # 7 -> row0 (3 left), 5 -> row1 (5 left), 4 -> row1 (1 left), 3 -> row0 (full), 2, 2 -> row2
    assert [[e.key for e in row] for row in rows] == [["k1", "k2"], ["k3", "k5"], ["k0", "k4"]]


def test_every_example_is_packed_once_and_no_row_overflows(demo_batches):
    batches, _ = demo_batches
    examples = [e for b in batches for e in examples_of(b)]
    budget = 2 * max(e.num_tokens for e in examples)
    rows = pack_examples(examples, budget)
    assert sorted(e.key + e.task for row in rows for e in row) == sorted(e.key + e.task for e in examples)
    assert all(sum(e.num_tokens for e in row) <= budget for row in rows)


def test_an_example_longer_than_a_row_is_an_error_naming_it():
    with pytest.raises(PackingError, match="k-long.*12 tokens.*max_tokens_per_batch"):
        pack_examples([fake_example("k-short", 4), fake_example("k-long", 12)], max_tokens=10)


def test_packed_row_holds_each_example_as_it_was(demo_batches, tokenizer):
    batches, _ = demo_batches
    examples = examples_of(batches[0])[:5]
    packed = collate_packed(examples, tokenizer.pad_token_id)
    lengths = [e.num_tokens for e in examples]
    total = sum(lengths)
    assert packed["input_ids"].shape == packed["labels"].shape == packed["attention_mask"].shape == (1, total)
    assert packed["position_ids"].shape == (4, 1, total)
    assert packed["cu_seqlens"].dtype == torch.int32
    assert packed["cu_seqlens"].tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert packed["max_seqlen"] == max(lengths)
    assert packed["num_tokens"] == total == int(packed["attention_mask"].sum())
    for i, e in enumerate(examples):
        a, b = int(packed["cu_seqlens"][i]), int(packed["cu_seqlens"][i + 1])
        assert np.array_equal(packed["input_ids"][0, a:b].numpy(), e.input_ids)
        assert packed["labels"][0, a] == IGNORE_INDEX  # never trained to follow the previous example
        assert np.array_equal(packed["labels"][0, a + 1:b].numpy(), e.labels[1:])
        assert packed["position_ids"][0, 0, a:b].tolist() == list(range(b - a))
        assert (packed["token_task_ids"][0, a:b] == TASK_IDS[e.task]).all()
        frames = e.features.shape[1]
        assert np.array_equal(packed["input_features"][i, :, :frames].numpy(), e.features)
        assert packed["feature_attention_mask"][i].sum() == frames
    assert torch.equal(packed["position_ids"][1:], packed["position_ids"][:1].expand(3, -1, -1))
    assert packed["task_ids"].tolist() == [TASK_IDS[e.task] for e in examples]
    assert packed["keys"] == [e.key for e in examples]
    # the labels the model trains on are the examples' own (their first label is a prompt token)
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == sum(int((e.labels != IGNORE_INDEX).sum()) for e in examples)


def test_tail_padding_is_a_segment_of_its_own_without_labels(tokenizer):
    examples = [fake_example("a", 5, "did"), fake_example("b", 6, "ser")]
    packed = collate_packed(examples, tokenizer.pad_token_id, pad_to_multiple_of=8)
    assert packed["input_ids"].shape == (1, 16)
    assert packed["num_tokens"] == 11
    assert packed["cu_seqlens"].tolist() == [0, 5, 11, 16]
    assert packed["position_ids"][0, 0].tolist() == list(range(5)) + list(range(6)) + list(range(5))
    assert (packed["input_ids"][0, 11:] == tokenizer.pad_token_id).all()
    assert (packed["labels"][0, 11:] == IGNORE_INDEX).all() and (packed["attention_mask"][0, 11:] == 0).all()
    assert (packed["token_task_ids"][0, 11:] == NO_TASK).all()


def test_packing_efficiency_of_padded_and_packed_batches(demo_batches, tokenizer):
    batches, cfg = demo_batches
    padded = packing_efficiency(batches)
    real = sum(b["num_tokens"] for b in batches)
    assert padded == pytest.approx(real / sum(b["input_ids"].shape[0] * b["input_ids"].shape[1] for b in batches))
    examples = [e for b in batches for e in examples_of(b)]
    rows = [collate_packed(r, tokenizer.pad_token_id) for r in pack_examples(examples, cfg.max_tokens_per_batch)]
    assert sum(r["num_tokens"] for r in rows) == real
    assert packing_efficiency(rows) == 1.0
    assert padded < 1.0
    with pytest.raises(ValueError, match="at least one"):
        packing_efficiency([])


def test_rows_from_a_lookahead_queue_fill_the_budget(demo_batches):
    """The stream's way: a queue refilled to LOOKAHEAD_BATCHES budgets, one row at a time."""
    batches, cfg = demo_batches
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    budget = cfg.max_tokens_per_batch
    rng = np.random.default_rng(0)
    queue, rows = [], []
    for _ in range(40):
        while sum(queue) < LOOKAHEAD_BATCHES * budget:
            queue.append(int(rng.choice(lengths)))
        chosen = select_packed_row(queue, budget)
        assert chosen[0] == 0  # the oldest always goes
        row = [queue[i] for i in chosen]
        assert sum(row) <= budget
        rows.append({"num_tokens": sum(row), "input_ids": torch.zeros(1, sum(row))})
        queue = [q for i, q in enumerate(queue) if i not in set(chosen)]
    fill = budget_fill(rows, budget)
    assert fill > 0.9, fill
    assert packing_efficiency(rows) == 1.0
    with pytest.raises(PackingError, match="4000 tokens.*max_tokens_per_batch"):
        select_packed_row([4000, 10], budget)


def test_a_packed_row_keeps_the_draw_mix_of_a_shorter_task():
    """Two tasks drawn alternately, one with examples about half as long: the row holds about as
    many of each as the queue offers (longest first from the whole queue took ~11% short ones)."""
    budget, rng, shares = 2048, np.random.default_rng(0), []
    for _ in range(50):
        queue, short = [], []
        while sum(queue) < LOOKAHEAD_BATCHES * budget:
            is_short = len(queue) % 2 == 1
            queue.append(int(rng.integers(75, 130) if is_short else rng.integers(150, 260)))
            short.append(is_short)
        chosen = select_packed_row(queue, budget)
        assert sum(queue[i] for i in chosen) <= budget
        shares.append(np.mean([short[i] for i in chosen]))
    assert np.mean(shares) > 0.4, np.mean(shares)


def test_budget_fill_of_the_padded_val_batches_is_what_they_carry(demo_batches):
    batches, cfg = demo_batches
    real = sum(b["num_tokens"] for b in batches)
    assert budget_fill(batches, cfg.max_tokens_per_batch) == pytest.approx(real / (len(batches) * cfg.max_tokens_per_batch))
