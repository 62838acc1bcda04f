"""engine.report on synthetic run folders written in the formats the engine logs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine.report import ReportError, load_run, main, run_status, write_report

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A 2x2 panel figure at the report's DPI is tens of kB; an empty canvas is far below this.
MIN_PLOT_BYTES = 15_000
TOKENS_PER_STEP = 4096
# Synthetic eval quality grows as decay * step up to this cap (keeps every rate in [0, 1]).
MAX_QUALITY = 0.95


def _training_row(step: int, stage: str, tasks: list[str], decay: float) -> dict:
    losses = {task: 3.0 * math.exp(-decay * step) + 0.1 * (index + 1)
              for index, task in enumerate(tasks)}
    return {"step": step, "tokens": step * TOKENS_PER_STEP, "stage": stage,
            "loss": sum(losses.values()) / len(losses), "loss_per_task": losses,
            "lr": 2e-4, "grad_norm": 1.1, "tokens_per_sec": 1500.0 + step, "mfu": 0.05,
            "mem_gib": 1.2, "data_wait_pct": 3.0, "elapsed_s": step * 2.7}


def _eval_row(step: int, stage: str, quality: float) -> dict:
    return {"event": "eval", "step": step, "tokens": step * TOKENS_PER_STEP, "stage": stage,
            "val_loss": {"asr": 2.5 - quality, "sum": 2.9 - quality,
                         "did": 1.5 - quality / 2, "ser": 1.4 - quality / 2},
            "val_label_acc": {"did": 0.2 + quality / 3, "ser": 0.25 + quality / 3},
            "metrics": {"asr": {"n": 8, "wer": 1.0 - quality / 2, "cer": 0.8 - quality / 2,
                                "wer_raw": 1.0, "cer_raw": 0.9},
                        "sum": {"n": 8, "rouge1": quality / 2, "rouge2": quality / 4,
                                "rougeL": quality / 2.5},
                        "did": {"n": 8, "accuracy": quality / 2, "macro_f1": quality / 3,
                                "invalid_rate": 0.5 - quality / 4},
                        "ser": {"n": 8, "accuracy": quality / 2, "macro_f1": quality / 2.5,
                                "invalid_rate": 0.4 - quality / 4}}}


def write_synthetic_run(run_dir: Path, recipe: str, stages: list[tuple[str, list[str], int]],
                        decay: float, final_eval: dict | None = None) -> Path:
    """A run folder: config.yaml, metrics.jsonl (training, stage and eval rows), summary.json."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"recipe: {recipe}\nseed: 0\noptim:\n  lr: 0.0002\n", encoding="utf-8")
    rows, step = [], 0
    for stage, tasks, length in stages:
        rows.append({"event": "stage", "step": step, "tokens": step * TOKENS_PER_STEP,
                     "stage": stage, "tasks": tasks})
        for _ in range(length):
            step += 1
            rows.append(_training_row(step, stage, tasks, decay))
            if step % 10 == 0:
                rows.append(_eval_row(step, stage, quality=min(MAX_QUALITY, decay * step)))
    (run_dir / "metrics.jsonl").write_text(
        "\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    last_training = rows[-1] if "loss" in rows[-1] else rows[-2]
    summary = {"recipe": recipe, "steps": step, "tokens": step * TOKENS_PER_STEP,
               "tokens_per_sec": 1600.0 + 100 * decay, "wall_s": step * 2.7,
               "final_loss_per_task": last_training["loss_per_task"], "world_size": 1,
               "device": "cpu", "adapter_dir": str(run_dir / "adapter"),
               "last_checkpoint": None, "eval": _eval_row(step, stages[-1][0], 0.5)["metrics"]}
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    if final_eval is not None:
        (run_dir / "eval.json").write_text(json.dumps(final_eval), encoding="utf-8")
    return run_dir


ALL_TASKS = ["asr", "sum", "did", "ser"]


@pytest.fixture
def two_runs(tmp_path):
    random_run = write_synthetic_run(
        tmp_path / "random-run", "random", [("all", ALL_TASKS, 40)], decay=0.02)
    hybrid_run = write_synthetic_run(
        tmp_path / "hybrid-run", "hybrid",
        [("tpc-asr", ["asr"], 10), ("tpc-sum", ["asr", "sum"], 10),
         ("tpc-all", ALL_TASKS, 10), ("ads", ALL_TASKS, 10)], decay=0.03,
        final_eval={"asr": {"wer": 0.1234, "cer": 0.0567}, "sum": {"rougeL": 0.4321},
                    "did": {"macro_f1": 0.7654}, "ser": {"macro_f1": 0.6543}})
    return random_run, hybrid_run


def _cells(line: str) -> list[str]:
    return [cell.strip().strip("*") for cell in line.strip("|").split("|")]


def _comparison_rows(report: str) -> dict[str, dict[str, str]]:
    """Rows of the comparison table (the first table), keyed by run, as {header: cell}."""
    table = report.split("## Final")[0]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = _cells(lines[0])
    return {cells[0]: dict(zip(header, cells)) for cells in map(_cells, lines[2:])}


def test_report_compares_two_runs_in_a_table_and_plots(two_runs, tmp_path, capsys):
    # Through the command line's main(), in-process: rendering the plots twice would double
    # this file's runtime.
    out_dir = tmp_path / "report"
    assert main([*map(str, two_runs), "--out", str(out_dir)]) == 0
    assert f"wrote {out_dir / 'report.md'}" in capsys.readouterr().out
    report = (out_dir / "report.md").read_text(encoding="utf-8")

    rows = _comparison_rows(report)
    assert list(rows) == ["random-run", "hybrid-run"]
    random_row, hybrid_row = rows["random-run"], rows["hybrid-run"]
    assert random_row["recipe"] == "random" and hybrid_row["recipe"] == "hybrid"
    assert random_row["tokens"] == f"{40 * TOKENS_PER_STEP:,}"
    assert hybrid_row["tokens/s"] == "1,603.0"
    # The hybrid run has eval.json: its values win over the eval rows.
    assert (hybrid_row["WER"], hybrid_row["ROUGE-L"], hybrid_row["DID macro-F1"]) == (
        "0.1234", "0.4321", "0.7654")
    assert hybrid_row["eval metrics from"] == "eval.json"
    # The random run has none: the last eval row (step 40, quality 0.02 * 40 = 0.8):
    # WER 1 - 0.8/2, SER macro-F1 0.8/2.5, val loss asr 2.5 - 0.8.
    assert random_row["eval metrics from"] == "eval @ step 40"
    assert random_row["WER"] == "0.6000" and random_row["SER macro-F1"] == "0.3200"
    assert random_row["val loss asr"] == "1.7000"
    # Best values are bold: the lower WER and val loss belong to the hybrid run (quality 0.95).
    table = report.split("## Final")[0]
    assert "**0.1234**" in table and "**0.6000**" not in table
    assert "**1.5500**" in table and "**1.7000**" not in table

    expected_plots = ["train_loss.png", "val_loss.png", "eval_asr.png", "eval_sum.png",
                      "eval_did.png", "eval_ser.png"]
    for name in expected_plots:
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > MIN_PLOT_BYTES, f"{name} is only {len(data)} bytes"
        assert f"]({name})" in report


def test_load_run_separates_stage_eval_and_training_rows(two_runs):
    run = load_run(two_runs[1])
    assert run.recipe == "hybrid"
    assert [row["stage"] for row in run.stage_rows] == ["tpc-asr", "tpc-sum", "tpc-all", "ads"]
    assert len(run.train_rows) == 40 and len(run.eval_rows) == 4
    assert run.final_eval["asr"]["wer"] == 0.1234


def test_recipe_name_key_and_summary_eval_fallback(two_runs, tmp_path):
    run_dir = two_runs[0]
    (run_dir / "config.yaml").write_text("name: tpc\n")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(
        "\n".join(line for line in lines if '"eval"' not in line) + "\n")
    run = load_run(run_dir)
    assert run.recipe == "tpc" and run.eval_rows == []
    report = write_report([run_dir], tmp_path / "out").read_text()
    row = _comparison_rows(report)["random-run"]
    assert row["recipe"] == "tpc"
    assert row["eval metrics from"] == "summary.json"
    assert row["WER"] == "0.7500"  # summary's eval: WER 1 - 0.5/2
    assert row["val loss asr"] == "—"  # no eval rows left


@pytest.mark.parametrize("missing", ["config.yaml", "metrics.jsonl", "summary.json"])
def test_missing_file_error_names_the_run_and_the_file(two_runs, tmp_path, missing):
    (two_runs[0] / missing).unlink()
    with pytest.raises(ReportError) as error:
        write_report(two_runs, tmp_path / "out")
    assert str(two_runs[0]) in str(error.value) and missing in str(error.value)


def test_cut_metrics_line_names_its_line_number(two_runs, tmp_path):
    with open(two_runs[1] / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 41, "tokens": 16')
    line_count = len((two_runs[1] / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(ReportError, match=f"metrics.jsonl line {line_count} is not valid JSON"):
        load_run(two_runs[1])


def test_cli_fails_clearly_on_a_missing_run(two_runs, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "engine.report", str(two_runs[0]), str(tmp_path / "nope"),
         "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "nope: folder not found" in completed.stderr
    assert not (tmp_path / "out" / "report.md").exists()


def test_stage_boundaries_after_the_first_stage_are_marked(two_runs):
    from matplotlib.figure import Figure

    from engine.report import _mark_stages

    axes = Figure().add_subplot()
    _mark_stages(axes, load_run(two_runs[1]), "tab:orange")
    # Four stages; the first starts at 0 tokens and needs no line.
    assert [line.get_xdata()[0] for line in axes.lines] == [
        10 * TOKENS_PER_STEP, 20 * TOKENS_PER_STEP, 30 * TOKENS_PER_STEP]
    assert [text.get_text().strip() for text in axes.texts] == ["tpc-sum", "tpc-all", "ads"]


def test_eval_json_may_wrap_its_metrics(two_runs):
    (two_runs[0] / "eval.json").write_text(json.dumps({"metrics": {"asr": {"wer": 0.25}}}))
    assert load_run(two_runs[0]).final_eval == {"asr": {"wer": 0.25}}


@pytest.mark.parametrize("out", ["a_file", "a_file/sub"])
def test_cli_out_that_is_not_a_folder_is_one_error_line(two_runs, tmp_path, out):
    (tmp_path / "a_file").write_text("not a folder\n")
    completed = subprocess.run(
        [sys.executable, "-m", "engine.report", str(two_runs[0]), "--out", str(tmp_path / out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr
    assert completed.stderr.startswith(f"error: --out {tmp_path / out}") and "folder" in completed.stderr
    assert (tmp_path / "a_file").read_text() == "not a folder\n"


def test_a_run_stopped_before_its_end_is_marked_with_how_far_it_got(two_runs, tmp_path):
    random_run, hybrid_run = two_runs
    with open(random_run / "config.yaml", "a", encoding="utf-8") as f:
        f.write("max_steps: 100\n")
    summary = json.loads((random_run / "summary.json").read_text())
    (random_run / "summary.json").write_text(json.dumps({**summary, "stopped_by": "SIGTERM"}))
    assert main([str(random_run), str(hybrid_run), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    rows = _comparison_rows(report)
    assert rows["random-run"]["status"] == "STOPPED at step 40 of 100 (SIGTERM)"
    assert rows["hybrid-run"]["status"] == "finished"
    assert "Stopped before the end of the run (resume it with the same command): random-run" in report
    # an older summary without stopped_by: its steps short of max_steps still mark it
    (random_run / "summary.json").write_text(json.dumps({**summary, "stopped_by": None}))
    assert run_status(load_run(random_run)) == "STOPPED at step 40 of 100"
