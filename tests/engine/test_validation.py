"""Validation during training and generation after it (engine/validation.py, engine.evaluate --run).

The multi-process runs (tests/engine/validation_worker.py under torchrun) are launched once per
module, 1 and 2 processes side by side, on a small demo set with three validation shards, so
two ranks get unequal numbers of validation samples.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.evaluate import main as evaluate_main
from engine.report import write_report
from engine.tokenizer import AUDIO_TOKEN, IM_END, build_tiny_tokenizer
from engine.generation import generation_batches, greedy_decode, select_for_generation, split_batch_rows
from engine.validation import Validator, scalar_metrics
from loaders.config import DataConfig
from loaders.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "engine" / "validation_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# A rank stuck in a collective shows up as this timeout (a healthy run takes ~1 min).
RUN_TIMEOUT_S = 300
# The worker's settings (validation_worker.SETTINGS): generation on 10 samples, max 3 steps.
GENERATED = 10
MAX_STEPS = 3
# Teacher-forced sums over ranks differ from one process only in float summation order.
LOSS_RTOL = 1e-5


# --- shared runs ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    from loaders.demo_data import write_demo_shards

    path = tmp_path_factory.mktemp("validation") / "shards"
    write_demo_shards(str(path), train_shards=2, val_shards=3, samples_per_shard=4)
    return path


def _launch(nproc: int, out: Path, shard_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(TORCHRUN + [f"--nproc_per_node={nproc}", str(WORKER), str(out), str(shard_dir), *extra],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory, shard_dir) -> dict:
    """{1: result of 1 process, 2: result of 2 processes (plus its training run)}."""
    root = tmp_path_factory.mktemp("validation_runs")
    outs = {1: root / "one", 2: root / "two"}
    procs = {1: _launch(1, outs[1], shard_dir), 2: _launch(2, outs[2], shard_dir, "--train")}
    results = {}
    for nproc, proc in procs.items():
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout (a rank hung in a collective?)"
        log = outs[nproc].parent / f"{outs[nproc].name}.log"
        assert code == 0, f"{nproc}-process validation run failed ({code}); log:\n{log.read_text()[-4000:]}"
        results[nproc] = json.loads((outs[nproc] / "result.json").read_text())
    results["run_dir"] = outs[2] / "run"
    return results


@pytest.fixture(scope="module")
def evaluated_run(worker_results, tmp_path_factory) -> Path:
    """A copy of the trained run, evaluated with `python -m engine.evaluate --run`."""
    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(worker_results["run_dir"], run)
    proc = subprocess.run([sys.executable, "-m", "engine.evaluate", "--run", str(run), "--max-samples", str(GENERATED)],
                          cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def assert_metrics_close(actual: dict, expected: dict, rel: float = 1e-9) -> None:
    """Metrics per task: the same tasks and metric names, numbers equal up to rel."""
    assert set(actual) == set(expected)
    for task in expected:
        assert actual[task] == pytest.approx(expected[task], rel=rel), task


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --- sharded validation ---------------------------------------------------------------------

def test_two_ranks_with_unequal_shares_finish_and_match_one_process(worker_results):
    one, two = worker_results[1], worker_results[2]
    assert two["examples_per_rank"][0] != two["examples_per_rank"][1]
    assert sum(two["examples_per_rank"]) == sum(one["examples_per_rank"])
    assert two["row"]["dummy_batches"] > 0 and one["row"]["dummy_batches"] == 0
    assert two["records"] == one["records"]  # same samples chosen, same greedy predictions
    assert len(one["records"]) == GENERATED
    assert_metrics_close(two["row"]["metrics"], one["row"]["metrics"])
    assert set(one["row"]["metrics"]) == set(TASKS)
    assert two["row"]["val_label_acc"] == pytest.approx(one["row"]["val_label_acc"])
    assert set(one["row"]["val_loss"]) == set(TASKS)
    assert two["row"]["val_loss"] == pytest.approx(one["row"]["val_loss"], rel=LOSS_RTOL)
    assert two["training_mode_after"] and one["training_mode_after"]
    # Validation draws no random numbers: a run with it trains exactly as one without it.
    assert two["rng_unchanged"] and one["rng_unchanged"]


def test_hooks_write_eval_rows_at_stage_boundaries_every_n_steps_and_at_the_end(worker_results):
    run = worker_results["run_dir"]
    rows = read_rows(run)
    evals = [row for row in rows if row.get("event") == "eval"]
    # stage switch at step 1, eval.every=2 at step 2 (the switch at step 2 does not repeat it), end at 3
    assert [row["step"] for row in evals] == [1, 2, MAX_STEPS]
    assert evals[0]["stage"] == "asr"  # the stage the validated model was trained in
    for row in evals:
        assert set(row["val_loss"]) == set(TASKS) and set(row["val_label_acc"]) == {"did", "ser"}
        assert row["n_generated"] == GENERATED and row["dummy_batches"] > 0
        assert all(0.0 <= row["val_label_acc"][task] <= 1.0 for task in ("did", "ser"))
        data = row["val_data"]   # the validation set's counts over both ranks
        assert data["read"] == data["used"] + sum(data["skipped"].values()) and data["used"] == row["n_val_examples"]
    assert worker_results[2]["steps_seen_by_earlier_hook"] == [1, 2, MAX_STEPS]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"] == evals[-1]["metrics"]


# --- generation after training --------------------------------------------------------------

def test_evaluate_run_writes_predictions_eval_json_and_md(evaluated_run, worker_results):
    predictions = [json.loads(line) for line in (evaluated_run / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == GENERATED
    assert all(set(p) == {"task", "key", "prediction", "reference"} and p["reference"] for p in predictions)
    document = json.loads((evaluated_run / "eval.json").read_text())
    assert (document["split"], document["n_samples"], document["max_samples"]) == ("val", GENERATED, GENERATED)
    metrics = document["metrics"]
    assert set(metrics) == set(TASKS)
    assert "confusion" in metrics["did"]
    # The saved adapter, loaded into a fresh 1-process model, decodes what the 2-process run
    # decoded in its final validation.
    summary = json.loads((evaluated_run / "summary.json").read_text())
    assert_metrics_close(scalar_metrics(metrics), summary["eval"])
    markdown = (evaluated_run / "eval.md").read_text()
    assert all(f"## {task}" in markdown for task in TASKS) and "| wer |" in markdown


def test_report_compares_two_evaluated_runs(evaluated_run, worker_results, tmp_path):
    report = write_report([worker_results["run_dir"], evaluated_run], tmp_path / "report")
    text = report.read_text()
    assert "eval.json" in text and f"eval @ step {MAX_STEPS}" in text  # where each run's metrics come from
    for name in ("train_loss.png", "val_loss.png", "eval_asr.png", "eval_did.png"):
        assert (tmp_path / "report" / name).read_bytes().startswith(b"\x89PNG"), name


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such run folder"),
    ("no_config", "has no config.yaml"),
    ("no_adapter", "adapter_model.safetensors"),
])
def test_evaluate_run_explains_what_is_missing(tmp_path, capsys, layout, message):
    run = tmp_path / "run"
    if layout != "missing":
        run.mkdir()
    if layout == "no_adapter":
        (run / "config.yaml").write_text("recipe: random\n")
    assert evaluate_main(["--run", str(run)]) == 2
    error = capsys.readouterr().err
    assert message in error and str(run) in error


def test_overrides_are_for_run_only(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["--predictions", str(tmp_path / "p.jsonl"), "data.val=x"])
    assert "--run only" in capsys.readouterr().err


# --- pieces ---------------------------------------------------------------------------------

def test_generation_choice_does_not_depend_on_the_shard_split():
    candidates = [(task, f"key-{i:03d}") for i in range(30) for task in TASKS[: 1 + i % 4]]
    whole = select_for_generation([candidates], 13)[0]
    halves = select_for_generation([candidates[::2], candidates[1::2]], 13)
    split = {(0, i): order for i, order in halves[0].items()} | {(1, i): order for i, order in halves[1].items()}
    chosen_whole = {candidates[i]: order for i, order in whole.items()}
    chosen_split = {(candidates[::2] if r == 0 else candidates[1::2])[i]: order for (r, i), order in split.items()}
    assert chosen_whole == chosen_split and len(chosen_whole) == 13
    assert sorted(chosen_whole.values()) == list(range(13))
    tasks_in_order = [task for (task, _), _ in sorted(chosen_whole.items(), key=lambda item: item[1])]
    assert tasks_in_order[:4] == list(TASKS)  # tasks take turns


class ScriptedModel(torch.nn.Module):
    """next_token_logits from a per-row script: token script[row][i] first at the i-th new
    position, `fallback` second everywhere."""

    def __init__(self, script: list[list[int]], prompt_lengths: list[int], vocab: int, fallback: int):
        super().__init__()
        self.script, self.prompt_lengths, self.vocab, self.calls = script, prompt_lengths, vocab, 0
        self.fallback = fallback
        self.lm_head = torch.nn.Linear(1, vocab)

    def forward(self, batch, mode="train"):
        assert mode == "next_token_logits"
        self.calls += 1
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        logits = torch.zeros(len(lengths), self.vocab)
        logits[:, self.fallback] = 1.0
        for row, length in enumerate(lengths):
            step = length - self.prompt_lengths[row]
            logits[row, self.script[row][min(step, len(self.script[row]) - 1)]] = 5.0 + step
        return logits


def test_greedy_decode_stops_rows_at_im_end_and_never_emits_audio_placeholders():
    tokenizer = build_tiny_tokenizer()
    im_end, audio = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    a, b, c = (tokenizer.convert_tokens_to_ids(ch) for ch in "abc")
    prompts = [torch.tensor([7, 8, 9]), torch.tensor([7, 8])]
    batch = {"input_ids": torch.tensor([[7, 8, 9], [7, 8, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "input_features": torch.randn(2, 128, 5), "feature_attention_mask": torch.ones(2, 5, dtype=torch.long)}
    # row 0: a, c, <|im_end|>; row 1 prefers <|AUDIO|> (banned: b is next best) at its 2nd
    # step, then runs to the token limit
    model = ScriptedModel([[a, c, im_end], [c, audio, a, a, a, a]], [len(p) for p in prompts], vocab=400, fallback=b)
    generated = greedy_decode(model, batch, max_new_tokens=5, stop_ids={im_end}, banned_ids=[audio],
                              device=torch.device("cpu"))
    assert generated == [[a, c], [c, b, a, a, a]]
    assert model.calls == 5  # row 1 keeps decoding after row 0 stopped
    dummy_model = ScriptedModel([[a], [a]], [3, 2], vocab=400, fallback=b)
    assert greedy_decode(dummy_model, batch, max_new_tokens=5, stop_ids={im_end}, banned_ids=[],
                         device=torch.device("cpu"), dummy=True) == [[], []]
    assert dummy_model.calls == 0  # alone, a dummy batch has no rank to keep pace with


def test_loader_rows_split_into_prompt_and_reference(shard_dir):
    from loaders.val_batches import build_val_batches

    tokenizer = build_tiny_tokenizer()
    cfg = DataConfig(train=str(shard_dir / "train-000000.tar"), val=str(shard_dir / "val-000000.tar"),
                     max_tokens_per_batch=1024)
    batches = build_val_batches(cfg, tokenizer, rank=0, world_size=1)
    samples = [s for batch in batches for s in split_batch_rows(batch, tokenizer)]
    assert len(samples) == sum(len(batch["keys"]) for batch in batches) > 0
    for sample in samples:
        assert tokenizer.decode(sample.prompt_ids).endswith("<|im_start|>assistant\n")
        assert sample.reference and IM_END not in sample.reference
        if sample.task in ("did", "ser"):
            assert sample.reference in cfg.dialects + cfg.emotions
    packed = generation_batches(samples, budget=1024, max_new_tokens=8, pad_id=0)
    assert sum(len(batch["samples"]) for batch in packed) == len(samples)
    assert all(batch["input_ids"].numel() + 8 * len(batch["samples"]) <= 1024 or len(batch["samples"]) == 1
               for batch in packed)


def test_validation_is_disabled_without_validation_data(shard_dir):
    from engine.config import RunConfig

    cfg = RunConfig()
    cfg.data = DataConfig(train=str(shard_dir / "train-000000.tar"), val="")
    env = type("Env", (), {"rank": 0, "world_size": 1, "device": torch.device("cpu")})()
    validator = Validator(cfg, env, model=None, tokenizer=build_tiny_tokenizer())
    assert not validator.enabled and "data.val" in validator.disabled_reason
    assert validator.run(step=1, tokens=10, stage="all") is None


class StubValidator:
    """Stands in for Validator in the hook tests: records when it runs."""

    enabled = True
    examples_per_rank = [4]
    val_data = {"records": 4, "read": 4, "used": 4, "skipped": {}}
    n_generated = 2

    batches = 3

    def __init__(self, *args, **kwargs):
        self.calls = []

    def run(self, *, step, tokens, stage, should_stop=None):
        from engine.validation import stop_if_asked

        for _ in range(self.batches):   # asked before every batch, as the real passes do
            stop_if_asked(should_stop)
        self.calls.append((step, stage))
        return {"event": "eval", "step": step, "tokens": tokens, "stage": stage, "val_loss": {"asr": 1.0},
                "val_label_acc": {}, "metrics": {"asr": {"wer": 1.0 / step}}, "n_generated": 2,
                "dummy_batches": 0, "eval_s": 0.1}


class StubTrainer:
    def __init__(self, cfg):
        from engine.trainer import TrainState

        self.cfg, self.state, self.hooks, self.rows, self.lines = cfg, TrainState(), {}, [], []
        self.stage = "asr"
        self.writer = type("Writer", (), {"write": lambda _, row: self.rows.append(row)})()
        self.stop_signal = None
        self.stop_after_asks = None  # stop_requested() turns True after this many calls
        self.asks = 0

    def stop_requested(self):
        self.asks += 1
        if self.stop_after_asks is not None and self.asks > self.stop_after_asks:
            self.stop_signal = "SIGTERM"
        return self.stop_signal is not None

    def stage_name(self):
        return self.stage

    def log(self, line):
        self.lines.append(line)

    def step_to(self, step, stage=None):
        self.state.step, self.state.tokens = step, 100 * step
        self.hooks["after_step"](self)
        if stage is not None:
            self.stage = stage
            self.hooks["on_stage_change"](self)


def _stub_trainer(monkeypatch, *overrides):
    import engine.validation as validation
    from engine.config import load_config

    monkeypatch.setattr(validation, "Validator", StubValidator)
    trainer = StubTrainer(load_config("random", ["max_steps=4", *overrides]))
    seen = []
    trainer.hooks["after_step"] = lambda t: seen.append(t.state.step)
    validator = validation.attach_validation(trainer, trainer.cfg, None, None, build_tiny_tokenizer())
    return trainer, validator, seen


def test_hooks_validate_every_n_steps_and_at_stage_switches_once_per_step(monkeypatch):
    from engine.validation import final_validation

    trainer, validator, seen = _stub_trainer(monkeypatch, "eval.every=2")
    trainer.step_to(1)
    trainer.step_to(2, stage="asr+sum")  # every=2 and a stage switch at the same step: one eval
    trainer.step_to(3, stage="all")
    trainer.step_to(4)
    trainer.hooks["on_end"](trainer)
    assert final_validation(trainer) == {"asr": {"wer": 0.25}}  # already validated at step 4
    assert validator.calls == [(2, "asr"), (3, "asr+sum"), (4, "all")]
    assert [row["step"] for row in trainer.rows] == [2, 3, 4] and trainer.last_eval["step"] == 4
    assert seen == [1, 2, 3, 4]  # the hook registered before keeps running
    assert any(line.startswith("eval @ step 3") for line in trainer.lines)


def test_final_validation_runs_at_the_end_unless_eval_at_end_is_off(monkeypatch):
    from engine.validation import final_validation

    trainer, validator, _ = _stub_trainer(monkeypatch)  # eval.every=0: boundaries and end only
    trainer.step_to(1)
    trainer.step_to(2)
    assert validator.calls == [] and final_validation(trainer) is None
    trainer.state.step = 4
    trainer.hooks["on_end"](trainer)
    assert final_validation(trainer) == {"asr": {"wer": 0.25}} and validator.calls == [(4, "asr")]
    trainer.hooks["on_end"](trainer)   # e.g. a resumed finished run: the step is validated already
    assert validator.calls == [(4, "asr")]
    at_end_off, off_validator, _ = _stub_trainer(monkeypatch, "eval.at_end=false")
    at_end_off.state.step = 4
    at_end_off.hooks["on_end"](at_end_off)
    assert final_validation(at_end_off) is None and off_validator.calls == []


def test_a_sigterm_abandons_a_validation_and_the_resumed_run_does_it_first(monkeypatch):
    """A SIGTERM in the middle of a pass (here before its second batch): no eval row, the step is
    recorded as pending (what the checkpoint stores) and validated first after the resume."""
    trainer, validator, _ = _stub_trainer(monkeypatch, "eval.every=2")
    trainer.step_to(1)
    trainer.stop_after_asks = trainer.asks + 1
    trainer.step_to(2)
    assert validator.calls == [] and trainer.rows == [] and trainer.asks == 2
    assert trainer.validation.pending == {"step": 2, "stage": "asr"} and trainer.validation.last_step is None
    assert any("validation at step 2 abandoned (SIGTERM)" in line for line in trainer.lines)

    resumed, resumed_validator, _ = _stub_trainer(monkeypatch, "eval.every=2")
    resumed.state.step, resumed.stage = 2, "asr+sum"   # the checkpoint's step; the stage moved on
    resumed.validation.pending = dict(trainer.validation.pending)
    resumed.hooks["on_resume"](resumed)
    assert resumed_validator.calls == [(2, "asr")], "validated under the stage it was abandoned in"
    assert resumed.validation.pending is None and [row["step"] for row in resumed.rows] == [2]
    resumed.hooks["on_resume"](resumed)   # nothing pending any more: no second pass
    assert resumed_validator.calls == [(2, "asr")]

    elsewhere, other_validator, _ = _stub_trainer(monkeypatch, "eval.every=2")
    elsewhere.state.step = 3   # pending for another step (not the one resumed from): not run
    elsewhere.validation.pending = {"step": 2, "stage": "asr"}
    elsewhere.hooks["on_resume"](elsewhere)
    assert other_validator.calls == []


def test_evaluate_run_scores_against_the_runs_own_label_sets():
    """A run trained with data.dialects=[ary,arz] is scored against those labels, not the defaults;
    --dialects on the command line still wins."""
    from engine.config import load_config
    from engine.evaluate import build_argument_parser, run_label_sets

    cfg = load_config("random", ["data.dialects=[ary,arz]"])
    args = build_argument_parser().parse_args(["--run", "somewhere"])
    assert run_label_sets(args, cfg)["did"] == ["ary", "arz"]
    assert run_label_sets(args, cfg)["ser"] == list(cfg.data.emotions)
    args = build_argument_parser().parse_args(["--run", "somewhere", "--dialects", "egy", "lev"])
    assert run_label_sets(args, cfg)["did"] == ["egy", "lev"]


def test_labels_that_share_a_first_token_are_named():
    from engine.config import load_config
    from engine.tokenizer import build_tiny_tokenizer
    from engine.validation import labels_sharing_a_first_token

    tokenizer = build_tiny_tokenizer()   # one token per character
    assert labels_sharing_a_first_token(tokenizer, load_config("random").data) == []
    cfg = load_config("random", ["data.dialects=[ary,arz,egy]", "data.emotions=[happy,hopeful,sad]"])
    assert labels_sharing_a_first_token(tokenizer, cfg.data) == ["did: ary, arz", "ser: happy, hopeful"]
