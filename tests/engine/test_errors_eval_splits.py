"""engine.evaluate --run on another split than val never overwrites the validation results;
eval.json records its split and sample counts, and the report says where its eval comes from."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from engine.evaluate import write_run_evaluation
from engine.report import final_eval_metrics, load_run


def python(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalsplits") / "run"
    proc = python("engine/train.py", "--recipe", "random", "max_steps=1", "metrics.progress_bar=false",
                  "eval.max_samples=2", "eval.max_new_tokens=2", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_train_split_results_go_to_their_own_files(trained_run):
    val = python("-m", "engine.evaluate", "--run", str(trained_run), "--max-samples", "2", "eval.max_new_tokens=2")
    assert val.returncode == 0, val.stderr[-3000:]
    val_files = {name: (trained_run / name).read_text() for name in ("eval.json", "eval.md", "predictions.jsonl")}
    document = json.loads(val_files["eval.json"])
    assert document["split"] == "val" and document["n_samples"] == 2 and document["max_samples"] == 2
    assert sum(document["n_samples_per_task"].values()) == 2 == len(val_files["predictions.jsonl"].splitlines())

    train = python("-m", "engine.evaluate", "--run", str(trained_run), "--split", "train", "--max-samples", "3",
                   "eval.max_new_tokens=2")
    assert train.returncode == 0, train.stderr[-3000:]
    for name, text in val_files.items():   # the validation results are untouched
        assert (trained_run / name).read_text() == text, name
    document = json.loads((trained_run / "eval-train.json").read_text())
    assert document["split"] == "train" and document["n_samples"] == 3 and document["max_samples"] == 3
    assert len((trained_run / "predictions-train.jsonl").read_text().splitlines()) == 3
    assert "3 train samples (--max-samples 3)" in (trained_run / "eval-train.md").read_text()

    # The report shows the val results and says so.
    run = load_run(trained_run)
    metrics, source = final_eval_metrics(run)
    assert source == "eval.json (val, 2 samples, --max-samples 2)"
    assert metrics == json.loads(val_files["eval.json"])["metrics"]
    report = python("-m", "engine.report", str(trained_run), "--out", str(trained_run.parent / "report"))
    assert report.returncode == 0, report.stderr[-3000:]
    assert "eval.json (val, 2 samples, --max-samples 2)" in (trained_run.parent / "report" / "report.md").read_text()


def test_the_report_names_a_split_that_is_not_val(tmp_path):
    records = [{"task": "did", "key": "k1", "prediction": "egy", "reference": "egy"}]
    metrics = {"did": {"accuracy": 1.0, "macro_f1": 1.0}}
    write_run_evaluation(tmp_path, records, metrics, "val")
    assert json.loads((tmp_path / "eval.json").read_text())["max_samples"] is None
    # an eval.json holding another split (as an older engine wrote for --split train) is shown as such
    (tmp_path / "eval.json").write_text(json.dumps({"split": "train", "n_samples": 4, "max_samples": 4,
                                                    "metrics": metrics}))
    from engine.report import eval_source

    assert eval_source(json.loads((tmp_path / "eval.json").read_text())) == \
        "eval.json (TRAIN split, not val, 4 samples, --max-samples 4)"
    assert eval_source({"asr": {"wer": 0.5}}) == "eval.json"   # an older file without split: as before
