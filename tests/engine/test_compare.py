"""`make compare` at a reduced budget: the four schedules on the demo data, then the report."""
import os
import subprocess
import sys

from conftest import REPO


def test_make_compare_runs_the_four_recipes_and_writes_the_report(tmp_path, demo_dir):
    out = tmp_path / "compare"
    args = (f"data.demo_dir={demo_dir} eval.max_samples=2 eval.max_new_tokens=4 metrics.log_every=1 "
            "data.max_tokens_per_batch=1024 metrics.tensorboard=false")
    proc = subprocess.run(
        ["make", "-o", ".venv/.installed", "compare", f"PY={sys.executable}", f"COMPARE_DIR={out}",
         "COMPARE_TOKENS=6000", f"COMPARE_ARGS={args}"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report" / "report.md").read_text()
    for recipe in ("random", "tpc", "ads", "hybrid"):
        assert recipe in report
        assert (out / recipe / "summary.json").exists()
    assert list((out / "report").glob("*.png"))
    # the same token budget for all four: each stopped at the first step past 6000 tokens
    import json

    tokens = {r: json.loads((out / r / "summary.json").read_text())["tokens"] for r in ("random", "tpc", "ads", "hybrid")}
    assert all(6000 <= t < 6000 + 2 * 1024 for t in tokens.values()), tokens
