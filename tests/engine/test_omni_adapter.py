"""engine/omni_adapter.py: a thinker adapter, converted, loads with PEFT onto the full
Qwen2.5-Omni model (thinker + talker + token2wav) and gives the thinker the same logits there.

The adapters are exported the way a run exports them (engine.checkpoint.export_adapter on a
model from engine.model.build_model), with random non-zero lora_B. The full model is transformers'
own Qwen2_5OmniForConditionalGeneration built from the tiny thinker config (engine/model.py) and
small talker and token2wav configs, random init; the thinker's base weights are copied over from
the thinker the adapter was trained on.
"""
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import export_adapter
from engine.config import LoRAConfig, LossConfig, ModelConfig
from engine.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from engine.model import VISION_START_TOKEN_ID, build_model, thinker_config
from engine.omni_adapter import convert_thinker_adapter, main, thinker_regex
from engine.tokenizer import build_tiny_tokenizer
from synthetic_batches import make_batch, randomize_lora_b

CPU = torch.device("cpu")
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
# fp32, the same modules and weights in the same order: measured equal to the last bit; the
# tolerance only allows for a different kernel choice between two model instances.
RTOL, ATOL = 1e-5, 1e-6
# Merged (W + scale * B A, one matmul instead of two): fp32 rounding differs, measured max |diff| 2.5e-6 on logits of
# magnitude ~4.
MERGED_RTOL, MERGED_ATOL = 1e-4, 1e-4
# lora_B ~ N(0, std): large enough that the adapter moves the logits well beyond ATOL.
LORA_B_STD = 0.05
AUDIO_TOWER_NOISE = 0.05  # added to the "trained" audio tower's weights (modules_to_save)

# A small talker: its own decoder layers with q/k/v/o and gate/up/down projections, like the real
# one. Its special token ids are put inside its small codec vocabulary (transformers checks them).
TALKER_VOCAB = 64
TINY_TALKER = dict(
    vocab_size=TALKER_VOCAB, embedding_size=128,  # embedding_size: the thinker's hidden size (tiny preset)
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    tts_text_start_token_id=50, tts_text_end_token_id=51, tts_text_pad_token_id=52, tts_codec_start_token_id=53,
    tts_codec_end_token_id=54, tts_codec_pad_token_id=55, tts_codec_mask_token_id=56, vision_start_token_id=57,
    vision_end_token_id=58, audio_start_token_id=59, audio_end_token_id=60, audio_token_index=61,
    image_token_index=62, video_token_index=63)
TINY_TOKEN2WAV = dict(
    dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, emb_dim=16,
                    enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8,
                    enc_se_channels=8, num_embeds=TALKER_VOCAB, mel_dim=8, look_ahead_layers=[1],
                    look_backward_layers=[0]),
    bigvgan_config=dict(mel_dim=8, upsample_initial_channel=16, upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
                        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]]))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def export_thinker_adapter(tokenizer, out_dir, *, targets=None, train_audio_encoder=False):
    """A run's adapter export, with random non-zero lora_B (and a changed audio tower when it is
    trained); returns (adapter folder, the thinker's base weights before any change)."""
    lora = LoRAConfig(**{**LORA.__dict__, **({"targets": targets} if targets else {})})
    model = build_model(ModelConfig(train_audio_encoder=train_audio_encoder, fsdp=False, liger=False), lora,
                        LossConfig(), tokenizer, CPU)
    base = {k: v.clone() for k, v in model.thinker.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    randomize_lora_b(model, LORA_B_STD)
    if train_audio_encoder:
        torch.manual_seed(11)
        with torch.no_grad():
            for p in model.audio_tower.parameters():
                p.add_(torch.randn_like(p) * AUDIO_TOWER_NOISE)
    return export_adapter(out_dir, model, rank=0, lora_cfg=lora, base_model=None), base


@pytest.fixture(scope="module")
def lora_adapter(tokenizer, tmp_path_factory):
    return export_thinker_adapter(tokenizer, tmp_path_factory.mktemp("thinker") / "adapter")


@pytest.fixture(scope="module")
def tower_adapter(tokenizer, tmp_path_factory):
    return export_thinker_adapter(tokenizer, tmp_path_factory.mktemp("tower") / "adapter", train_audio_encoder=True)


def build_full_omni(tokenizer, base: dict):
    """transformers' full Qwen2.5-Omni (thinker + talker + token2wav), the thinker's weights copied from `base`."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    config = Qwen2_5OmniConfig(thinker_config=thinker_config("tiny", tokenizer, "sdpa"), talker_config=TINY_TALKER,
                               token2wav_config=TINY_TOKEN2WAV)
    torch.manual_seed(3)
    full = Qwen2_5OmniForConditionalGeneration(config).eval()
    assert full.has_talker and hasattr(full, "token2wav")
    result = full.thinker.load_state_dict(base, strict=False)
    # The full model's thinker keeps its vision encoder (the base thinker had it removed).
    assert result.unexpected_keys == [] and all(k.startswith("model.visual.") for k in result.missing_keys), result
    full.thinker.config.vision_start_token_id = VISION_START_TOKEN_ID   # DESIGN.md, known traps
    return full


def build_thinker_alone(tokenizer, base: dict):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    thinker = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config("tiny", tokenizer, "sdpa")).eval()
    del thinker.model.visual
    thinker.load_state_dict(base, strict=True)
    return thinker


def load_with_peft(model, adapter_dir):
    """PeftModel.from_pretrained, failing on PEFT's warning about adapter keys it could not place."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    problems = [str(w.message) for w in caught if "adapter keys" in str(w.message) or "not found" in str(w.message)]
    assert not problems, problems
    return peft_model


def thinker_logits(thinker, batch) -> torch.Tensor:
    with torch.no_grad():
        return thinker(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       input_features=batch["input_features"],
                       feature_attention_mask=batch["feature_attention_mask"]).logits.float()


def lora_module_names(peft_model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]


def check_every_tensor_loaded(peft_model, adapter_dir) -> None:
    """What PEFT saves from the loaded model is exactly the converted file: nothing missing, nothing extra."""
    from peft import get_peft_model_state_dict

    written = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    held = get_peft_model_state_dict(peft_model)
    assert sorted(held) == sorted(written)
    for key, tensor in written.items():
        assert torch.equal(held[key], tensor), key


@pytest.mark.parametrize("which", ["lora_adapter", "tower_adapter"])
def test_converted_adapter_loads_onto_the_full_omni_model_with_the_same_thinker_logits(which, tokenizer, tmp_path,
                                                                                        request):
    adapter, base = request.getfixturevalue(which)
    out = tmp_path / "omni"
    summary = convert_thinker_adapter(adapter, out)
    assert summary["tensors"] == len(load_file(str(adapter / ADAPTER_WEIGHTS)))

    full = load_with_peft(build_full_omni(tokenizer, base), out)
    check_every_tensor_loaded(full, out)
    names = lora_module_names(full)
    assert names and all(n.startswith("base_model.model.thinker.model.language_model.layers.") for n in names), names
    thinker_alone = load_with_peft(build_thinker_alone(tokenizer, base), adapter)
    assert len(names) == len(lora_module_names(thinker_alone))
    if which == "tower_adapter":
        config = json.loads((out / ADAPTER_CONFIG).read_text())
        assert config["modules_to_save"] == ["thinker.model.audio_tower"]
        tower = full.base_model.model.thinker.model.audio_tower
        assert type(tower).__name__ == "ModulesToSaveWrapper"

    batch = make_batch(tokenizer, seed=5)
    expected = thinker_logits(thinker_alone.base_model.model, batch)
    got = thinker_logits(full.base_model.model.thinker, batch)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    with full.disable_adapter():   # the adapter is really in the path: without it the logits move
        without = thinker_logits(full.base_model.model.thinker, batch)
    assert (without - got).abs().max() > 100 * ATOL
    merged = full.merge_and_unload()   # what the README suggests for inference: a plain Omni model again
    assert type(merged).__name__ == "Qwen2_5OmniForConditionalGeneration" and not lora_module_names(merged)
    torch.testing.assert_close(thinker_logits(merged.thinker, batch), expected, rtol=MERGED_RTOL, atol=MERGED_ATOL)


def test_the_thinker_adapter_itself_does_not_load_onto_the_full_model(lora_adapter, tokenizer):
    """Why the conversion exists: PEFT finds none of the thinker adapter's modules in the full model."""
    from peft import PeftModel

    adapter, base = lora_adapter
    with pytest.raises(ValueError, match="not found in the base model"):
        PeftModel.from_pretrained(build_full_omni(tokenizer, base), str(adapter))


def test_config_is_kept_but_for_the_prefixed_names(lora_adapter, tmp_path):
    adapter, _ = lora_adapter
    convert_thinker_adapter(adapter, tmp_path / "omni")
    before = json.loads((adapter / ADAPTER_CONFIG).read_text())
    after = json.loads((tmp_path / "omni" / ADAPTER_CONFIG).read_text())
    assert after.pop("target_modules") == r"^thinker\.(?:" + before.pop("target_modules")[1:-1] + ")$"
    assert after == before
    keys_before = load_file(str(adapter / ADAPTER_WEIGHTS))
    keys_after = load_file(str(tmp_path / "omni" / ADAPTER_WEIGHTS))
    assert sorted(keys_after) == sorted(k.replace("base_model.model.", "base_model.model.thinker.", 1) for k in keys_before)


def test_target_regex_never_matches_the_talker_or_the_audio_encoder(lora_adapter):
    adapter, _ = lora_adapter
    pattern = thinker_regex(json.loads((adapter / ADAPTER_CONFIG).read_text())["target_modules"])
    assert re.fullmatch(pattern, "thinker.model.language_model.layers.3.self_attn.q_proj")
    assert re.fullmatch(pattern, "thinker.model.language_model.layers.0.mlp.down_proj")
    for name in ("talker.model.layers.0.self_attn.q_proj", "talker.model.layers.1.mlp.up_proj",
                 "thinker.model.audio_tower.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.q_proj",
                 "talker.thinker.model.language_model.layers.0.self_attn.q_proj"):
        assert not re.fullmatch(pattern, name), name


def test_list_target_modules_become_a_regex_that_stays_in_the_thinker(tokenizer, tmp_path):
    """PEFT matches a list by suffix, which in the full model would reach the talker's o_proj too."""
    adapter, base = export_thinker_adapter(tokenizer, tmp_path / "adapter", targets=["o_proj"])
    config_path = adapter / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "target_modules": ["o_proj"]}))
    convert_thinker_adapter(adapter, tmp_path / "omni")
    full = load_with_peft(build_full_omni(tokenizer, base), tmp_path / "omni")
    check_every_tensor_loaded(full, tmp_path / "omni")
    names = lora_module_names(full)
    assert len(names) == 4 and all(n.startswith("base_model.model.thinker.model.language_model.layers.") for n in names)


# --- refusals: one `error:` line naming the path, exit code 2 ---------------------------------

def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def adapter_copy(adapter: Path, folder: Path, **config_changes) -> Path:
    """The adapter's weights in a new folder, its config with ``config_changes``."""
    folder.mkdir()
    (folder / ADAPTER_WEIGHTS).write_bytes((adapter / ADAPTER_WEIGHTS).read_bytes())
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, **config_changes}))
    return folder


def assert_refused(argv, capsys, *needles) -> None:
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, err)


def test_cli_converts_and_prints_a_summary(lora_adapter, tmp_path, capsys):
    adapter, _ = lora_adapter
    code, out, err = run_cli([adapter, tmp_path / "omni"], capsys)
    assert code == 0, err
    n = len(load_file(str(adapter / ADAPTER_WEIGHTS)))
    assert f"{n} tensors" in out and r"^thinker\." in out


def test_cli_help_names_both_folders(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "ADAPTER_DIR" in out and "OUT_DIR" in out and "Qwen2_5OmniForConditionalGeneration" in out


def test_refuses_a_missing_folder_and_a_folder_that_is_no_adapter(tmp_path, capsys):
    assert_refused([tmp_path / "nowhere", tmp_path / "out"], capsys, tmp_path / "nowhere", "not a folder")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    assert_refused([tmp_path / "run", tmp_path / "out"], capsys, tmp_path / "run", ADAPTER_CONFIG)
    assert not (tmp_path / "out").exists()


def test_refuses_a_config_that_is_not_json_or_not_lora(lora_adapter, tmp_path, capsys):
    adapter, _ = lora_adapter
    broken = adapter_copy(adapter, tmp_path / "broken")
    (broken / ADAPTER_CONFIG).write_text("{not json")
    assert_refused([broken, tmp_path / "out"], capsys, broken / ADAPTER_CONFIG, "not valid JSON")
    (broken / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "IA3", "target_modules": "x"}))
    assert_refused([broken, tmp_path / "out"], capsys, "'IA3'", "only LoRA")
    (broken / ADAPTER_CONFIG).write_text((adapter / ADAPTER_CONFIG).read_text())
    (broken / ADAPTER_WEIGHTS).write_bytes(b"not a safetensors file")
    assert_refused([broken, tmp_path / "out"], capsys, broken / ADAPTER_WEIGHTS, "cannot be read as safetensors")
    assert not (tmp_path / "out").exists()


def test_refuses_modules_to_save_without_their_tensors(lora_adapter, tmp_path, capsys):
    adapter, _ = lora_adapter
    odd = adapter_copy(adapter, tmp_path / "odd", modules_to_save=["audio_tower"])
    assert_refused([odd, tmp_path / "out"], capsys, odd / ADAPTER_CONFIG, "'audio_tower'", "holds no tensor")


def test_refuses_an_adapter_already_converted(lora_adapter, tmp_path, capsys):
    adapter, _ = lora_adapter
    convert_thinker_adapter(adapter, tmp_path / "omni")
    assert_refused([tmp_path / "omni", tmp_path / "again"], capsys, tmp_path / "omni", "already an adapter for the full")
    assert not (tmp_path / "again").exists()


def test_refuses_an_output_folder_that_is_not_empty(lora_adapter, tmp_path, capsys):
    adapter, _ = lora_adapter
    out = tmp_path / "omni"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_refused([adapter, out], capsys, out, "not empty")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert_refused([adapter, out / "notes.txt"], capsys, out / "notes.txt", "not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli([adapter, empty], capsys)[0] == 0      # an empty folder is fine


def test_refuses_a_pattern_that_cannot_be_prefixed(lora_adapter, tmp_path, capsys):
    """Anchors inside the pattern (`^a|^b`) would silently stop matching under `thinker.`."""
    adapter, _ = lora_adapter
    layers = r"model\.language_model\.layers\.\d+"
    odd = adapter_copy(adapter, tmp_path / "odd", target_modules=rf"^{layers}\.self_attn\.\w+|^{layers}\.mlp\.\w+$")
    assert_refused([odd, tmp_path / "out"], capsys, odd / ADAPTER_CONFIG, "does not match the adapted module")
    assert not (tmp_path / "out").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
