"""profiling/bench_train.py end to end on the tiny preset, its 7b batch maker, and memory_report."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from profiling.bench_train import synthetic_micro_batch
from profiling.memory_report import GIB, memory_report

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_train")
    cmd = [sys.executable, "-m", "profiling.bench_train", "--steps", "1", "--warmup", "1", "--budget", "256",
           "--demo-dir", str(tmp / "demo"), "--json", str(tmp / "report.json"), "--csv", str(tmp / "bench.csv")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"bench_train failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    return tmp, proc.stdout


def test_tiny_bench_writes_json_csv_and_prints_the_table_last(bench_run):
    tmp, stdout = bench_run
    report = json.loads((tmp / "report.json").read_text())
    results = report["results"]
    assert set(results) == {"ours", "baseline"}
    for r in results.values():
        assert r["timed_steps"] == 1 and r["tokens_timed"] > 0 and r["tokens_per_s"] > 0 and r["step_s_mean"] > 0
        assert r["peak_gib"] > 0 and r["memory"]["parameters_gib"] > 0 and r["memory"]["optimizer_state_gib"] > 0
        assert r["mfu"] is None  # CPU: no known peak, so no MFU is claimed
    comparison = report["comparison"]
    assert comparison["speedup"] == pytest.approx(results["ours"]["tokens_per_s"] / results["baseline"]["tokens_per_s"])
    assert comparison["goals"]["speedup"]["target"] == 1.5
    rows = list(csv.DictReader(open(tmp / "bench.csv")))
    assert len(rows) == 1
    assert rows[0]["preset"] == "tiny" and rows[0]["git"] and rows[0]["device"].startswith("cpu")
    assert float(rows[0]["speedup"]) == pytest.approx(comparison["speedup"], rel=1e-3)
    last = stdout.strip().splitlines()
    assert last[-1].startswith("goals (tiny)") and any(line.startswith("ours / baseline") for line in last[-4:])


def test_baseline_and_ours_saw_the_same_real_tokens_and_start_from_the_same_model(bench_run):
    tmp, _ = bench_run
    report = json.loads((tmp / "report.json").read_text())
    ours, base = report["results"]["ours"], report["results"]["baseline"]
    assert ours["tokens_total"] == base["tokens_total"] > 0
    assert ours["tokens_timed"] == base["tokens_timed"]
    assert report["comparison"]["same_real_tokens"] is True
    # LoRA B starts at zero in both, so step 1 is the same frozen thinker on the same batch:
    # equal losses show both variants really trained the same model on the same samples.
    assert ours["first_loss"] == pytest.approx(base["first_loss"], rel=1e-4)


def test_synthetic_7b_batches_have_real_layout_within_the_budget():
    from engine.tokenizer import AUDIO_TOKEN, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    gen = torch.Generator().manual_seed(3)
    for task in ("asr", "sum", "did", "ser"):
        batch = synthetic_micro_batch(tokenizer, gen, 4096, task)
        B, T = batch["input_ids"].shape
        assert B * T <= 4096 and B >= 1
        assert batch["num_tokens"] == int(batch["attention_mask"].sum())
        frames = batch["feature_attention_mask"].sum(dim=1)
        a = (frames - 1) // 2 + 1
        expected_audio = (a - 2) // 2 + 1  # the model's own formula
        assert torch.equal((batch["input_ids"] == audio_id).sum(dim=1), expected_audio)
        targets = batch["labels"] != -100
        assert targets.any(dim=1).all() and not (targets & (batch["attention_mask"] == 0)).any()
        assert int(batch["input_ids"].max()) < 151643  # no id that Qwen reads as a vision token


def test_memory_report_counts_parameters_gradients_and_optimizer_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Linear(20, 10))
    model[0].requires_grad_(False)  # frozen: 30*20 + 20 = 620 floats
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(4, 30)).square().sum().backward()
    optimizer.step()
    report = memory_report(model, optimizer, "cpu")
    trainable = (20 * 10 + 10) * 4
    assert report["frozen_parameters_gib"] * GIB == pytest.approx(620 * 4)
    assert report["trainable_parameters_gib"] * GIB == pytest.approx(trainable)
    assert report["gradients_gib"] * GIB == pytest.approx(trainable)
    # AdamW: exp_avg and exp_avg_sq like each parameter, plus a 4-byte step per parameter tensor
    assert report["optimizer_state_gib"] * GIB == pytest.approx(2 * trainable + 2 * 4)
    assert report["peak_gib"] > report["parameters_gib"] and report["peak_activations_gib"] > 0
