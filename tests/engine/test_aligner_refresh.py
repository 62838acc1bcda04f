"""ADS embeddings refreshed from the training forward (model.train_audio_encoder=true): the
captured vectors are the aligner embeddings embed_shards computes, and a real training run
refreshes them, saves them with its checkpoints and resumes exactly."""
import json

import numpy as np
import pytest
import torch

from engine.aligner_refresh import AlignerCapture
from engine.config import ModelConfig
from engine.model import build_thinker, locate_parts
from engine.tokenizer import build_tiny_tokenizer
from loaders.embed_shards import aligner_embeddings
from tests.engine.conftest import CLI_SETTINGS, run_cli, step_rows


def test_captured_vectors_equal_the_aligner_embeddings_of_embed_shards():
    thinker = build_thinker(ModelConfig(preset="tiny"), build_tiny_tokenizer(), device=torch.device("cpu"),
                            dtype=torch.float32)
    tower = locate_parts(thinker).audio_tower
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((128, frames)).astype(np.float32) for frames in (37, 200, 101)]
    expected = aligner_embeddings(tower.eval(), clips)
    capture = AlignerCapture(tower)
    aligner_embeddings(tower, clips)                 # eval mode: validation and decoding are not captured
    assert capture.pop().shape[0] == 0
    tower.train()
    aligner_embeddings(tower, clips[:2])
    aligner_embeddings(tower, clips[2:])             # two micro-batches of one step
    got = capture.pop()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert capture.pop().shape[0] == 0
    capture.close()


# ADS from the first step with a trainable encoder; a refresh every 2 steps, so that the run
# below publishes at steps 2 and 4 and the resume at step 3 replays across the second one.
REFRESH_SETTINGS = CLI_SETTINGS + ["max_steps=5", "debug.nonfinite_loss_at=[]", "model.train_audio_encoder=true",
                                   "schedule.embedding_refresh_every=2", "schedule.ads_pool=48",
                                   "checkpoint.every=3", "eval.every=0"]


def test_a_trainable_encoder_run_refreshes_ads_embeddings_and_resumes_exactly(demo_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--recipe", "ads", f"data.demo_dir={demo_dir}"]
    proc = run_cli(common + [f"output_dir={straight}"] + REFRESH_SETTINGS, 1, tmp_path / "straight.txt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ADS embeddings: refreshed from the training forward" in proc.stdout
    data = json.loads((straight / "summary.json").read_text())["data"]
    assert data["embedding_refreshes"] >= 2 and data["embeddings"]["refreshed"] > 0
    assert 0 < data["embedding_hit_rate"] <= 1
    rows = step_rows(straight)
    assert max(r["embedding_refreshes"] for r in rows) == data["embedding_refreshes"]
    saved = torch.load(straight / "checkpoints" / "step_00000003" / "rank0.pt", weights_only=False)
    assert len(saved["stream"]["embeddings"]["cache"]["ids"]) > 0

    first = run_cli(common + [f"output_dir={resumed}"] + REFRESH_SETTINGS + ["debug.stop_after_steps=3"], 1,
                    tmp_path / "first.txt")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(common + [f"output_dir={resumed}"] + REFRESH_SETTINGS, 1, tmp_path / "second.txt")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    for a, b in zip(rows, step_rows(resumed), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert (a["tasks"], a["embedding_refreshes"]) == (b["tasks"], b["embedding_refreshes"])
    assert json.loads((resumed / "summary.json").read_text())["data"] == data


def test_a_trained_encoder_is_exported_as_peft_modules_to_save(demo_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from engine.config import load_config
    from engine.lora import load_adapter_into
    from engine.model import build_model

    out = tmp_path / "run"
    proc = run_cli(["--recipe", "ads", f"data.demo_dir={demo_dir}", f"output_dir={out}", "max_steps=2"]
                   + REFRESH_SETTINGS[:-4], 1, tmp_path / "log.txt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["audio_tower"]
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tokenizer = build_tiny_tokenizer()
    cfg = load_config("ads", ["model.train_audio_encoder=true"])
    base = build_thinker(cfg.model, tokenizer, device=torch.device("cpu"), dtype=torch.float32)
    tower = locate_parts(base).audio_path     # model.audio_tower, or audio_tower in the flat layout
    conv = f"base_model.model.{tower}.conv1.weight"
    assert not torch.equal(tensors[conv], locate_parts(base).audio_tower.conv1.weight)   # it trained
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    loaded = dict(peft_model.named_parameters())
    assert torch.equal(loaded[f"base_model.model.{tower}.modules_to_save.default.conv1.weight"], tensors[conv])
    ours = build_model(cfg.model, cfg.lora, cfg.loss, tokenizer, torch.device("cpu"))
    assert load_adapter_into(ours, adapter) == len(tensors)
    assert torch.equal(ours.audio_tower.conv1.weight, tensors[conv])
