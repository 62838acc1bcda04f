"""Model-ready batches made in code, for engine tests that must not depend on the loader.

Real prompt layout (audio placeholders between audio bos/eos, a target after the prompt),
random log-mel features, and target lengths that differ from batch to batch so that a
wrong loss normalization (a mean of per-batch means, a missing world-size factor) shows.
"""
import torch

from engine.tokenizer import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, IM_END, IM_START
from loaders.tasks import TASKS


def audio_tokens(frames: int) -> int:
    a = (frames - 1) // 2 + 1
    return (a - 2) // 2 + 1


def make_batch(tokenizer, seed: int, batch_size: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS, IM_START, IM_END)}
    letters = list(range(150, 180))
    seqs, labels, frames = [], [], []
    for _ in range(batch_size):
        f = int(torch.randint(60, 220, (1,), generator=g))
        target = [letters[int(i)] for i in torch.randint(0, len(letters), (int(torch.randint(2, 12, (1,), generator=g)),), generator=g)]
        prompt = [ids[IM_START], 20, 21, ids[AUDIO_BOS]] + [ids[AUDIO_TOKEN]] * audio_tokens(f) + [ids[AUDIO_EOS], ids[IM_END], ids[IM_START], 22]
        seq = prompt + target + [ids[IM_END]]
        seqs.append(seq)
        labels.append([-100] * len(prompt) + target + [ids[IM_END]])
        frames.append(f)
    T, F = max(map(len, seqs)), max(frames)
    batch = {"input_ids": torch.zeros(batch_size, T, dtype=torch.long),
             "attention_mask": torch.zeros(batch_size, T, dtype=torch.long),
             "labels": torch.full((batch_size, T), -100, dtype=torch.long),
             "task_ids": torch.randint(0, len(TASKS), (batch_size,), generator=g),
             "input_features": torch.randn(batch_size, 128, F, generator=g),
             "feature_attention_mask": torch.zeros(batch_size, F, dtype=torch.long)}
    for i, (s, l, f) in enumerate(zip(seqs, labels, frames)):
        batch["input_ids"][i, :len(s)] = torch.tensor(s)
        batch["attention_mask"][i, :len(s)] = 1
        batch["labels"][i, :len(l)] = torch.tensor(l)
        batch["feature_attention_mask"][i, :f] = 1
    batch["num_tokens"] = int(batch["attention_mask"].sum())
    batch["keys"] = [f"synthetic-{seed}-{i}" for i in range(batch_size)]
    batch["tasks"] = [TASKS[int(t)] for t in batch["task_ids"]]
    return batch


class FixedStream:
    """A global list of micro-batches per step, dealt to ranks: rank r takes micro-batches r, r+W, ..."""

    def __init__(self, tokenizer, *, rank: int, world_size: int, global_micro: int, seed: int = 0, repeat_first: bool = False):
        self.tokenizer, self.rank, self.world_size = tokenizer, rank, world_size
        self.global_micro, self.seed, self.repeat_first = global_micro, seed, repeat_first
        self.position = 0

    def next_step(self) -> list[dict]:
        step = 0 if self.repeat_first else self.position
        self.position += 1
        ids = [self.seed * 1000 + step * self.global_micro + j for j in range(self.global_micro)]
        return [make_batch(self.tokenizer, i) for i in ids[self.rank::self.world_size]]

    def set_tasks(self, tasks, weights=None) -> None:
        pass

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def counts(self) -> dict:
        return {}


def randomize_lora_b(model, std: float, seed: int = 7) -> None:
    """LoRA B starts at zero, which hides the adapter path: give it seeded random values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, std)
