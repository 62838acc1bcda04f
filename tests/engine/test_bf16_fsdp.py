"""The configuration of a real GPU run, on CPU: a bf16 frozen base with fp32 trainable weights
(LoRA, and the audio encoder when it trains), sharded by FSDP2 over two processes, checkpointed
and resumed. CPU runs default to fp32, so without this test the mixed-dtype FSDP2 path would
first run on a GPU."""
import math

from conftest import run_cli, step_rows


def test_bf16_base_with_fp32_trainables_trains_and_resumes_under_fsdp2(demo_dir, tmp_path):
    out = tmp_path / "run"
    settings = ["--recipe", "random", f"output_dir={out}", f"data.demo_dir={demo_dir}", "model.dtype=bf16",
                "model.fsdp=true", "model.train_audio_encoder=true", "data.max_tokens_per_batch=1024",
                "checkpoint.every=2", "metrics.log_every=1", "metrics.progress_bar=false", "metrics.tensorboard=false",
                "eval.at_end=false", "optim.warmup_steps=0"]
    first = run_cli(settings + ["max_steps=2"], 2, tmp_path / "first.log")
    assert first.returncode == 0, first.stderr[-3000:]
    # (the audio encoder trains in fp32; its one unused parameter stays frozen, in fp32 with it)
    assert "FSDP2 on" in first.stdout and "weights: frozen bfloat16/float32, trainable float32" in first.stdout
    resumed = run_cli(settings + ["max_steps=3"], 2, tmp_path / "resumed.log")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000002" in resumed.stdout
    rows = step_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
