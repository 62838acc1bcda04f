"""loaders/prompts.py: Qwen chat prompt with expanded audio placeholder; labels cover exactly
the assistant response (target + <|im_end|>)."""
import pytest
import torch

from engine.tokenizer import build_tiny_tokenizer
from loaders.prompts import (
    AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, IGNORE_INDEX, IM_END, audio_token_count, build_prompt_ids,
    instruction_language, instruction_text, prompt_text,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_audio_token_count_is_the_models_formula():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    frames = torch.tensor([1, 2, 3, 4, 5, 99, 100, 101, 157, 3000, 4500, 6001])
    _, expected = Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, frames)
    assert [audio_token_count(int(f)) for f in frames] == expected.tolist()
    assert audio_token_count(100 * 45) == 25 * 45


@pytest.mark.parametrize("task,target,labels", [
    ("asr", "ذهب الولد الى المدرسة", ()),
    ("sum", "الولد المدرسة", ()),
    ("did", "egy", ("egy", "glf", "lev", "msa", "nor")),
    ("ser", "angry", ("neutral", "happy", "sad", "angry")),
])
@pytest.mark.parametrize("lang", ["en", "ar"])
def test_labels_cover_exactly_the_assistant_response(tokenizer, task, target, labels, lang):
    n_audio = 37
    instruction = instruction_text(task, lang, labels)
    ids = build_prompt_ids(tokenizer, instruction=instruction, target=target, n_audio_tokens=n_audio)
    assert len(ids.input_ids) == len(ids.labels)
    labelled = [i for i, label in enumerate(ids.labels) if label != IGNORE_INDEX]
    # One contiguous run, right after the prompt, equal to the input ids there.
    assert labelled == list(range(ids.num_prompt_tokens, labelled[-1] + 1))
    assert all(ids.labels[i] == ids.input_ids[i] for i in labelled)
    assert tokenizer.decode([ids.input_ids[i] for i in labelled]) == target + IM_END
    assert len(labelled) == ids.num_target_tokens + 1
    # The prompt is the Qwen template with exactly n audio placeholders between bos/eos.
    text = tokenizer.decode(ids.input_ids)
    assert text == prompt_text(instruction, n_audio) + target + IM_END + "\n"
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    assert ids.input_ids.count(audio_id) == n_audio
    bos, eos = ids.input_ids.index(tokenizer.convert_tokens_to_ids(AUDIO_BOS)), ids.input_ids.index(
        tokenizer.convert_tokens_to_ids(AUDIO_EOS))
    assert eos - bos - 1 == n_audio
    if labels:
        assert all(label in instruction for label in labels)


def test_mixed_instruction_language_is_stable_per_key():
    langs = {key: instruction_language(key, "mixed") for key in (f"utt-{i}" for i in range(40))}
    assert set(langs.values()) == {"en", "ar"}
    assert all(instruction_language(key, "mixed") == lang for key, lang in langs.items())
    assert instruction_language("x", "ar") == "ar" and instruction_language("x", "en") == "en"
