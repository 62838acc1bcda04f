"""Task prompts in Qwen2.5-Omni's chat format, with labels for the assistant response only.

One example becomes::

    <|im_start|>system\\n{SYSTEM_PROMPT}<|im_end|>\\n
    <|im_start|>user\\n<|audio_bos|><|AUDIO|> x n<|audio_eos|>{instruction}<|im_end|>\\n
    <|im_start|>assistant\\n{target}<|im_end|>\\n

``n`` is the number of audio tokens the model's audio encoder produces for the clip's
feature frames (``audio_token_count``, the model's own formula, 25 per second). Labels are
-100 everywhere except the assistant response: the target tokens and the closing
``<|im_end|>`` (HF convention: labels align with input_ids; the model shifts). The prompt
part (everything up to and including ``<|im_start|>assistant\\n``) and the response are
tokenized separately, so the boundary is exact for any tokenizer, and generation at eval
time can feed ``prompt_ids`` alone.

DID and SER answers are the label names of the closed sets (e.g. ``msa``, ``angry``).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
IGNORE_INDEX = -100  # label value the loss ignores (torch cross_entropy / HF convention)

# Short on purpose: every token of it is paid for in every example.
SYSTEM_PROMPT = "You are a speech assistant."

# Per-task instructions. DID/SER instructions list the closed label set, so the model sees
# the answer space; "{labels}" is filled from the recipe's data.dialects / data.emotions.
INSTRUCTIONS = {
    "en": {
        "asr": "Transcribe the audio.",
        "sum": "Summarize the audio.",
        "did": "Identify the dialect ({labels}).",
        "ser": "Identify the emotion ({labels}).",
    },
    "ar": {
        "asr": "فرّغ الكلام المسموع نصًّا.",
        "sum": "لخّص الكلام المسموع.",
        "did": "حدّد اللهجة ({labels}).",
        "ser": "حدّد العاطفة ({labels}).",
    },
}


def audio_token_count(num_frames: int) -> int:
    """Audio tokens for ``num_frames`` feature frames.

    transformers Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths: a stride-2 conv
    halves the frames, then a stride-2 pooling halves them again (25 tokens per second).
    """
    if num_frames <= 0:
        return 0
    after_conv = (num_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def instruction_language(key: str, instruction_lang: str) -> str:
    """"en", "ar", or for "mixed" a choice from a hash of the key (stable across runs and resumes)."""
    if instruction_lang != "mixed":
        return instruction_lang
    return "ar" if zlib.crc32(key.encode("utf-8")) % 2 else "en"


def instruction_text(task: str, lang: str, labels: list[str] | tuple[str, ...] = ()) -> str:
    return INSTRUCTIONS[lang][task].format(labels=", ".join(labels))


def prompt_text(instruction: str, n_audio_tokens: int) -> str:
    """Everything the model sees before the answer, ending with the assistant header."""
    return (
        f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
        f"{IM_START}user\n{AUDIO_BOS}{AUDIO_TOKEN * n_audio_tokens}{AUDIO_EOS}{instruction}{IM_END}\n"
        f"{IM_START}assistant\n"
    )


@dataclass
class PromptIds:
    input_ids: list[int]
    labels: list[int]
    num_prompt_tokens: int
    num_target_tokens: int  # target text only, without the closing <|im_end|>


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def target_token_count(tokenizer, target: str) -> int:
    return len(_encode(tokenizer, target))


def first_target_token(tokenizer, target: str) -> int:
    """The first label token of a response ``target`` (what validation's label accuracy checks)."""
    return _encode(tokenizer, target)[0]


def build_prompt_ids(tokenizer, *, instruction: str, target: str, n_audio_tokens: int) -> PromptIds:
    """input_ids and labels of one example; labels cover exactly the response + <|im_end|>."""
    prompt = _encode(tokenizer, prompt_text(instruction, n_audio_tokens))
    target_ids = _encode(tokenizer, target)
    response = target_ids + _encode(tokenizer, IM_END)
    tail = _encode(tokenizer, "\n")
    input_ids = prompt + response + tail
    labels = [IGNORE_INDEX] * len(prompt) + response + [IGNORE_INDEX] * len(tail)
    return PromptIds(input_ids, labels, len(prompt), len(target_ids))


def shortest_example_tokens(tokenizer, task: str, instruction_lang: str, labels=()) -> int:
    """Tokens of the shortest possible example of ``task``: one audio token and the shortest
    target (a closed-set label of did/ser, else one character). A micro-batch budget below it
    can hold no example of the task at all."""
    langs = ("en", "ar") if instruction_lang == "mixed" else (instruction_lang,)
    targets = tuple(labels) if labels else ("a",)
    return min(len(build_prompt_ids(tokenizer, instruction=instruction_text(task, lang, labels), target=target,
                                    n_audio_tokens=1).input_ids) for lang in langs for target in targets)
