"""The thinker as we build it: vision removed, LoRA only in the LLM, checkpoint loading."""
import pytest
import torch

from engine.config import LoRAConfig, LossConfig, ModelConfig, ModelPathError
from engine.model import build_model, build_thinker, locate_parts, text_position_ids
from engine.tokenizer import AUDIO_TOKEN, build_tiny_tokenizer, load_checkpoint_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(ModelConfig(), LoRAConfig(), LossConfig(impl="reference"), tokenizer, CPU)


def test_vision_encoder_is_removed_and_base_is_frozen(model):
    names = [n for n, _ in model.named_parameters()]
    assert not any(".visual." in n or n.startswith("visual.") for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)


def test_lora_lands_in_the_llm_only_never_in_the_audio_encoder(model):
    parts = locate_parts(model.thinker)
    assert model.lora_modules and all(m.startswith(parts.llm_path + ".layers.") for m in model.lora_modules)
    tower_lora = [n for n, _ in parts.audio_tower.named_parameters() if "lora" in n]
    assert tower_lora == []
    kinds = {m.rsplit(".", 1)[-1] for m in model.lora_modules}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_positions_equal_transformers_rope_index(model, tokenizer):
    audio = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    ids = torch.tensor([[2, 9, 5] + [audio] * 7 + [6, 40, 41, 3, 0, 0],
                        [2, 9, 5] + [audio] * 4 + [6, 40, 41, 42, 43, 44, 3, 0, 0]])
    mask = (torch.arange(ids.shape[1]) < torch.tensor([[14], [14]])).long()
    # transformers moved get_rope_index from the thinker to its inner model during 5.x
    owner = model.thinker.model if hasattr(model.thinker.model, "get_rope_index") else model.thinker
    expected, _ = owner.get_rope_index(ids, None, None, mask, False, torch.tensor([30, 20]), None)
    ours = text_position_ids(mask)
    assert ours.shape == (3, 2, ids.shape[1])
    assert torch.equal(ours * mask, expected * mask)


def test_checkpoint_folder_loads_with_the_same_weights(tmp_path, tokenizer):
    reference = build_thinker(ModelConfig(seed=3), tokenizer, device=CPU, dtype=torch.float32)
    full = build_thinker(ModelConfig(seed=3), tokenizer, device=CPU, dtype=torch.float32)
    full.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded = build_thinker(ModelConfig(path=str(tmp_path / "ckpt")), None, device=CPU, dtype=torch.float32)
    want = reference.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    tok = load_checkpoint_tokenizer(tmp_path / "ckpt")
    assert tok.convert_tokens_to_ids(AUDIO_TOKEN) == tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)


def test_incomplete_checkpoint_folder_gets_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelPathError, match="safetensors"):
        build_thinker(ModelConfig(path=str(tmp_path)), None, device=CPU, dtype=torch.float32)
    with pytest.raises(ModelPathError, match="not a folder"):
        build_thinker(ModelConfig(path=str(tmp_path / "nope")), None, device=CPU, dtype=torch.float32)
    with pytest.raises(ModelPathError, match="tokenizer"):
        load_checkpoint_tokenizer(tmp_path)


# The published Qwen2.5-Omni checkpoints hold the whole model: the thinker's weights under
# "thinker." in the original module layout, beside the talker's and token2wav's.
PUBLISHED_LAYOUT = (("model.language_model.", "thinker.model."), ("model.audio_tower.", "thinker.audio_tower."),
                    ("model.visual.", "thinker.visual."), ("lm_head.", "thinker.lm_head."))


def write_published_layout(folder, thinker, tokenizer, drop: str | None = None):
    """A full-model checkpoint folder (Qwen2_5OmniConfig, "thinker."-prefixed weights, a talker
    weight) holding `thinker`'s weights; `drop`: a weight name left out, as a partial download."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5OmniConfig

    def published(key):
        return next(new + key[len(old):] for old, new in PUBLISHED_LAYOUT if key.startswith(old))
    tensors = {published(k): v.contiguous().clone() for k, v in thinker.state_dict().items() if k != drop}
    tensors["talker.model.embed_tokens.weight"] = torch.randn(7, 5)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    Qwen2_5OmniConfig(thinker_config=thinker.config.to_dict()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_published_full_model_checkpoint_loads_the_thinker_and_skips_the_rest(tmp_path, tokenizer):
    reference = build_thinker(ModelConfig(seed=5), tokenizer, device=CPU, dtype=torch.float32)
    write_published_layout(tmp_path / "omni", reference, tokenizer)
    loaded = build_thinker(ModelConfig(path=str(tmp_path / "omni")), None, device=CPU, dtype=torch.float32)
    want, got = reference.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_checkpoint_missing_a_weight_is_refused_not_filled_at_random(tmp_path, tokenizer):
    reference = build_thinker(ModelConfig(seed=5), tokenizer, device=CPU, dtype=torch.float32)
    dropped = "model.language_model.layers.1.mlp.down_proj.weight"
    assert dropped in reference.state_dict()
    write_published_layout(tmp_path / "omni", reference, tokenizer, drop=dropped)
    with pytest.raises(ModelPathError, match="1 weight\\(s\\) of the thinker are not in the checkpoint") as e:
        build_thinker(ModelConfig(path=str(tmp_path / "omni")), None, device=CPU, dtype=torch.float32)
    assert dropped in str(e.value) and "model.safetensors.index.json" in str(e.value)
