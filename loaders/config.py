"""The data room's configuration: one typed dataclass, built from the recipe's ``data:`` block.

Dependency-free on purpose: the engine's config module composes ``DataConfig`` and must be
importable without torch, soundfile or transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loaders.tasks import DEFAULT_DIALECTS, DEFAULT_EMOTIONS

INSTRUCTION_LANGS = ("en", "ar", "mixed")
ON_ERROR_CHOICES = ("skip", "raise")


@dataclass
class DataConfig:
    """Where the shards are and how samples become model-ready micro-batches.

    train / val: shard URLs, brace notation allowed (``data/x/train-{000000..000007}.tar``);
        a string may hold several URLs separated by whitespace. A string or a flat list is
        one source; a list of lists is several sources (``[[a-{0..7}.tar], [b-{0..3}.tar]]``).
        ``""`` means the embedded demo set (generated into ``demo_dir`` on first use).
    weights: one weight per source of ``train``. Empty = every source weighs 1. A source's
        share of a task's examples is its weight times its number of examples of that task.
    dialects / emotions: closed label sets of DID and SER; a label outside them is skipped
        and counted (or an error with ``strict``).
    instruction_lang: language of the per-task instruction: "en", "ar", or "mixed" (chosen
        per sample from a hash of its key, so resumed runs choose the same).
    max_tokens_per_batch: padded token slots per micro-batch (batch size x longest sequence).
    max_audio_seconds: longer recordings are skipped and counted, never truncated.
    max_text_tokens: targets that tokenize to more tokens are skipped and counted.
    shuffle_buffer: examples per shuffle block of each per-task stream (0 or 1 = no shuffling).
        A block holds the samples' undecoded bytes: 64 blocks of 30 s FLAC are about 30 MB per task.
    num_workers: DataLoader worker processes per rank (0 = decode in the training process).
        On a 2-core machine the training process already uses both cores, so 0 is the default.
    on_error: "skip" (warn with shard and key, count by reason, go on) or "raise".
    strict: raise on a DID/SER label outside the closed set even when on_error is "skip".
    seed: shard order, shuffling and task mixing derive from it.
    packing: pack several samples into one row of at most max_tokens_per_batch tokens, each
        attending only to itself (loaders.packing); max_tokens_per_batch then counts real tokens.
    demo_dir: where the embedded demo shards are generated when ``train`` is "".
    """

    train: str | list = ""
    val: str | list = ""
    weights: list[float] = field(default_factory=list)
    dialects: list[str] = field(default_factory=lambda: list(DEFAULT_DIALECTS))
    emotions: list[str] = field(default_factory=lambda: list(DEFAULT_EMOTIONS))
    instruction_lang: str = "en"
    max_tokens_per_batch: int = 2048
    max_audio_seconds: float = 60.0
    max_text_tokens: int = 256
    shuffle_buffer: int = 64
    num_workers: int = 0
    on_error: str = "skip"
    strict: bool = False
    seed: int = 0
    packing: bool = False
    demo_dir: str = "data/demo"

    def __post_init__(self) -> None:
        if self.instruction_lang not in INSTRUCTION_LANGS:
            raise ValueError(
                f"data.instruction_lang={self.instruction_lang!r}; expected one of {', '.join(INSTRUCTION_LANGS)}"
            )
        if self.on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"data.on_error={self.on_error!r}; expected 'skip' or 'raise'")
        if self.max_tokens_per_batch <= 0 or self.max_text_tokens <= 0 or self.max_audio_seconds <= 0:
            raise ValueError(
                "data.max_tokens_per_batch, data.max_text_tokens and data.max_audio_seconds must be positive "
                f"(got {self.max_tokens_per_batch}, {self.max_text_tokens}, {self.max_audio_seconds})"
            )
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("data.num_workers and data.shuffle_buffer must be >= 0")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ValueError(f"data.weights={self.weights}: weights must be >= 0 and not all 0")
