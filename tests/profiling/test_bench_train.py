"""profiling/bench_train.py end to end on the tiny preset (padded, packed, baseline in one run), its
batch makers (profiling/bench_batches.py), its CSV, and memory_report."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from profiling.bench_batches import collect_synthetic_steps, pack_steps, rank_share, synthetic_micro_batch
from profiling.memory_report import GIB, memory_report

REPO = Path(__file__).resolve().parents[2]
# A CSV row as bench_train wrote it before the packing columns existed.
OLD_CSV = ("time_utc,git,device,torch,preset,recipe,nproc,budget,micro_per_step,grad_ckpt,steps,warmup,repeats,"
           "torch_threads,padding_pct,ours_tokens_per_s,ours_step_s_mean,ours_peak_gib,ours_mfu,ours_tokens_total,"
           "baseline_tokens_per_s,baseline_step_s_mean,baseline_peak_gib,baseline_mfu,baseline_tokens_total,speedup,"
           "memory_ratio,same_real_tokens\n"
           "2026-11-27T13:06:03+00:00,5ad1eed,cpu (x86_64),2.13.0+cpu,tiny,random,1,2048,1,False,10,2,3,2,3.83,"
           "4455.59114,0.43247,0.78552,,23107,8772.16135,0.21966,0.75613,,23107,0.5079,1.0389,True\n")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_train")
    (tmp / "bench.csv").write_text(OLD_CSV)
    cmd = [sys.executable, "-m", "profiling.bench_train", "--steps", "1", "--warmup", "1", "--budget", "256",
           "--packing", "both", "--demo-dir", str(tmp / "demo"), "--json", str(tmp / "report.json"), "--csv", str(tmp / "bench.csv")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"bench_train failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    return tmp, proc.stdout


def test_tiny_bench_writes_json_csv_and_prints_the_table_last(bench_run):
    tmp, stdout = bench_run
    report = json.loads((tmp / "report.json").read_text())
    results = report["results"]
    assert set(results) == {"ours", "ours_packed", "baseline"}
    for r in results.values():
        assert r["timed_steps"] == 1 and r["tokens_timed"] > 0 and r["tokens_per_s"] > 0 and r["step_s_mean"] > 0
        assert r["peak_gib"] > 0 and r["memory"]["parameters_gib"] > 0 and r["memory"]["optimizer_state_gib"] > 0
        assert r["mfu"] is None  # CPU: no known peak, so no MFU is claimed
    comparison = report["comparison"]
    assert comparison["speedup"] == pytest.approx(results["ours"]["tokens_per_s"] / results["baseline"]["tokens_per_s"])
    assert comparison["goals"]["speedup"]["target"] == 1.5
    rows = list(csv.DictReader(open(tmp / "bench.csv")))
    assert len(rows) == 2
    old, new = rows
    assert old["speedup"] == "0.5079" and old["ours_tokens_total"] == "23107" and old["packing"] == ""
    assert new["preset"] == "tiny" and new["git"] and new["device"].startswith("cpu") and new["packing"] == "both"
    assert float(new["speedup"]) == pytest.approx(comparison["speedup"], rel=1e-3)
    assert float(new["ours_packed_tokens_per_s"]) == pytest.approx(results["ours_packed"]["tokens_per_s"], rel=1e-3)
    assert float(new["packed_vs_padded_speedup"]) == pytest.approx(comparison["packed_vs_padded_speedup"], rel=1e-3)
    assert float(new["ours_packed_packing_eff"]) == pytest.approx(results["ours_packed"]["packing_efficiency"], abs=1e-4)
    old_header = OLD_CSV.splitlines()[0].split(",")
    header = open(tmp / "bench.csv").readline().strip().split(",")
    assert header[:len(old_header)] == old_header and "packing" in header[len(old_header):]  # appended
    last = stdout.strip().splitlines()
    assert last[-1].startswith("goals (tiny)") and any(line.startswith("ours / baseline") for line in last[-4:])
    assert any(line.startswith("packed / padded") for line in last[-6:])


def test_baseline_and_ours_saw_the_same_real_tokens_and_start_from_the_same_model(bench_run):
    tmp, _ = bench_run
    report = json.loads((tmp / "report.json").read_text())
    ours, packed, base = (report["results"][v] for v in ("ours", "ours_packed", "baseline"))
    assert ours["tokens_total"] == packed["tokens_total"] == base["tokens_total"] > 0
    assert ours["tokens_timed"] == packed["tokens_timed"] == base["tokens_timed"]
    assert report["comparison"]["same_real_tokens"] is True
    # LoRA B starts at zero in all, so step 1 is the same frozen thinker on the same samples:
    # equal losses show every variant really trained the same model on the same samples, and
    # that packing kept each sample's attention to itself.
    assert ours["first_loss"] == pytest.approx(base["first_loss"], rel=1e-4)
    assert packed["first_loss"] == pytest.approx(ours["first_loss"], rel=1e-4)


def test_packed_rows_have_no_padding_and_padded_ones_do(bench_run):
    tmp, _ = bench_run
    report = json.loads((tmp / "report.json").read_text())
    res, files = report["results"], report["settings"]["batches"]
    assert res["ours_packed"]["packing_efficiency"] == 1.0  # no tail padding: every slot is a real token
    assert res["ours"]["packing_efficiency"] == res["baseline"]["packing_efficiency"] < 1.0
    padded, packed = files["batches.pt"], files["batches-packed.pt"]
    assert packed["real_tokens"] == padded["real_tokens"] == packed["token_slots"] < padded["token_slots"]
    assert packed["micro_batches"] <= padded["micro_batches"]
    assert report["comparison"]["packed_vs_padded_speedup"] == pytest.approx(
        res["ours_packed"]["tokens_per_s"] / res["ours"]["tokens_per_s"])


@pytest.mark.parametrize("world_size", [1, 2])
def test_pack_steps_keeps_each_ranks_samples_and_targets_per_step(world_size):
    budget = 4096
    steps = collect_synthetic_steps(3, 2 * world_size, budget, seed=5)
    packed = pack_steps(steps, budget, world_size, pad_token_id=0)
    for rank in range(world_size):
        for padded_step, packed_step in zip(rank_share(steps, rank, world_size), rank_share(packed, rank, world_size)):
            assert 1 <= len(packed_step) <= len(padded_step)
            assert sorted(k for mb in padded_step for k in mb["keys"]) == sorted(k for mb in packed_step for k in mb["keys"])
            for row in packed_step:
                assert row["input_ids"].shape[0] == 1 and row["input_ids"].shape[1] == row["num_tokens"] <= budget
                assert int(row["cu_seqlens"][-1]) == row["num_tokens"] and row["position_ids"].shape[0] == 4

            def targets(batches):  # the target token ids, as a multiset
                return sorted(int(t) for mb in batches for t in mb["input_ids"][mb["labels"] != -100])

            assert targets(padded_step) == targets(packed_step) != []
    # every rank runs as many rows as the others in each step (FSDP gathers per forward)
    assert all(len(step) % world_size == 0 for step in packed)


def test_packing_mode_picks_the_engine_variants():
    from profiling.bench_train import parse_args

    assert parse_args([]).run_variants == ["ours", "baseline"]
    assert parse_args(["--packing", "on"]).run_variants == ["ours_packed", "baseline"]
    assert parse_args(["--packing", "both", "--variants", "baseline,ours"]).run_variants == ["baseline", "ours", "ours_packed"]
    with pytest.raises(SystemExit):
        parse_args(["--variants", "ours_packed"])


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
