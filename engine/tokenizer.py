"""The embedded tokenizer of the `tiny` preset, and loading a checkpoint's own.

The tiny preset cannot download Qwen's 151k-token vocabulary, and does not need it: a
character-level vocabulary over ASCII and the Arabic block keeps the embedding table small
(a few hundred rows) while tokenizing every transcript of the demo data and of real Arabic
text. The Omni chat and audio special tokens are the real ones, spelled as Qwen2.5-Omni
spells them, so prompts built for the tiny model are the prompts a 7B run uses.

The tokenizer is built deterministically from code on every call (it takes milliseconds),
so nothing binary is shipped and two processes always agree on every id.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.config import ModelPathError

PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
# Order fixes the ids 0..6 of the tiny vocabulary.
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, IM_START, IM_END, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)

# Characters of the tiny vocabulary: tab, newline, printable ASCII and the whole Arabic
# block (letters, diacritics, Arabic-Indic digits, punctuation) U+0600..U+06FF.
_CHARACTERS = ["\t", "\n"] + [chr(c) for c in range(32, 127)] + [chr(c) for c in range(0x0600, 0x0700)]

# Rows of the embedding table: the vocabulary rounded up to a multiple of 64, as real
# checkpoints pad theirs (Qwen2.5: 151,665 tokens in a 152,064-row table) for GEMM tiling.
TINY_VOCAB_MULTIPLE = 64

# Qwen's chat template, text-only form: audio placeholders are spelled out by the loader.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer of the tiny preset (about 360 tokens)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character is its own word; special tokens are matched before this split.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, IM_END, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def tiny_vocab_rows(tokenizer: PreTrainedTokenizerFast) -> int:
    """Embedding rows for the tiny model: len(tokenizer) rounded up to TINY_VOCAB_MULTIPLE."""
    n = len(tokenizer)
    return -(-n // TINY_VOCAB_MULTIPLE) * TINY_VOCAB_MULTIPLE


def load_checkpoint_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved with a local Qwen2.5-Omni checkpoint, with a clear error if absent."""
    path = Path(path)
    if not path.is_dir():
        raise ModelPathError(f"model.path={path} is not a folder; point it at a local Qwen2.5-Omni checkpoint")
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ModelPathError(
            f"model.path={path} has no tokenizer files (tokenizer.json / tokenizer_config.json). "
            "Point model.path at a complete Qwen2.5-Omni checkpoint folder (as downloaded from the hub)."
        )
    tok = AutoTokenizer.from_pretrained(str(path))
    missing = [t for t in (IM_START, IM_END, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS) if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        raise ModelPathError(f"model.path={path}: its tokenizer lacks the Omni special tokens {missing}: is this a Qwen2.5-Omni checkpoint?")
    if tok.pad_token is None:
        tok.pad_token = PAD_TOKEN
    return tok
