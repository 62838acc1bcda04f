"""Evaluation from the command line: predictions read from a file, or generated with a trained
run's model and adapter, scored with engine.scoring; with --run, eval.json and eval.md are written.

Command line:
- ``python -m engine.evaluate --predictions FILE.jsonl`` scores a JSON-lines file whose lines
  hold ``task``, ``prediction`` and ``reference`` and prints a JSON object of metrics per task.
  A bad line stops it with the line number and the problem (exit code 2).
- ``python -m engine.evaluate --run RUN_DIR [--split val|train] [--max-samples N]
  [--adapter DIR] [key=value ...]`` loads the run's config.yaml (plus overrides, e.g.
  ``data.val=...``), builds its model, loads its adapter (RUN_DIR/adapter unless --adapter),
  generates greedily in batches on the split's shards (all samples unless --max-samples) and
  writes predictions.jsonl (task, key, prediction, reference), eval.json (split, sample
  counts, --max-samples, adapter, and "metrics" per task) and eval.md into RUN_DIR; for
  --split train the files are predictions-train.jsonl, eval-train.json and eval-train.md, so
  the validation results (which engine.report shows) are never overwritten. Under torchrun the samples are split across ranks
  (``torchrun --nproc_per_node=2 -m engine.evaluate -- --run RUN_DIR``: the ``--`` keeps
  torchrun from taking ``--run`` for an abbreviation of its own ``--run-path``). Generation is
  engine.generation's lockstep greedy decoding, the same code that validates during training.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

from engine.arabic_text import TAA_MARBUTA_OPTIONS
from engine.scoring import PredictionRecord, closed_label_sets, score_records
from loaders.tasks import DEFAULT_DIALECTS, DEFAULT_EMOTIONS, TASKS


# --- prediction files (JSON lines: task, prediction, reference)

class PredictionFileError(ValueError):
    """A predictions file cannot be read or holds a malformed line."""


PREDICTION_FIELDS = ("task", "prediction", "reference")


def _parse_prediction_line(text: str, where: str, line_number: int) -> PredictionRecord:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise PredictionFileError(f"{where}: not valid JSON ({error.msg} at column "
                                  f"{error.colno}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise PredictionFileError(
            f"{where}: expected a JSON object with {', '.join(PREDICTION_FIELDS)}, "
            f"got a JSON {type(row).__name__}")
    missing = [field for field in PREDICTION_FIELDS if field not in row]
    if missing:
        raise PredictionFileError(f"{where}: missing field(s) {', '.join(missing)}; "
                                  f"each line needs {', '.join(PREDICTION_FIELDS)}")
    if row["task"] not in TASKS:
        raise PredictionFileError(
            f"{where}: unknown task {row['task']!r}; expected one of {', '.join(TASKS)}")
    for field in ("prediction", "reference"):
        if not isinstance(row[field], str):
            raise PredictionFileError(f"{where}: field {field!r} must be a string, "
                                      f"got {type(row[field]).__name__}")
    return PredictionRecord(row["task"], row["prediction"], row["reference"], line_number)


def read_prediction_file(path: str | Path) -> list[PredictionRecord]:
    """All records of a predictions file; blank lines are allowed and skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PredictionFileError(f"{path}: no such predictions file") from None
    except UnicodeDecodeError as error:
        raise PredictionFileError(f"{path}: not UTF-8 text ({error.reason} at byte "
                                  f"{error.start})") from None
    records = []
    for line_number, text in enumerate(lines, start=1):
        if text.strip():
            records.append(_parse_prediction_line(text, f"{path}:{line_number}", line_number))
    if not records:
        raise PredictionFileError(f"{path}: holds no prediction lines; nothing to score")
    return records


# --- markdown (eval.md)

def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else str(value)


def metrics_markdown(metrics_by_task: dict[str, dict]) -> str:
    """One table of scalar metrics per task, plus the confusion matrix for did/ser."""
    sections = []
    for task, metrics in metrics_by_task.items():
        lines = [f"## {task}", "", "| metric | value |", "|---|---|"]
        for name, value in metrics.items():
            if value is None or isinstance(value, (int, float)):
                lines.append(f"| {name} | {_format_value(value)} |")
        confusion = metrics.get("confusion")
        if confusion:
            lines += ["", "Confusion (rows: reference, columns: prediction)", "",
                      "| reference | " + " | ".join(confusion["columns"]) + " |",
                      "|---" * (len(confusion["columns"]) + 1) + "|"]
            for row_label, row in zip(confusion["rows"], confusion["matrix"]):
                lines.append(f"| {row_label} | " + " | ".join(str(count) for count in row) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


# --- generation after training (--run)

class RunFolderError(ValueError):
    """A run folder that cannot be evaluated; the message names the path and what to do."""


RUN_CONFIG_FILE = "config.yaml"
RUN_ADAPTER_DIR = "adapter"
RUN_OUTPUTS = ("predictions.jsonl", "eval.json", "eval.md")
# The split whose results are the run's evaluation (the report reads them): its files keep the
# plain names; another split's get the split in theirs (eval-train.json), so that evaluating the
# training shards never overwrites the validation results.
MAIN_SPLIT = "val"


def run_output_names(split: str) -> tuple[str, ...]:
    """predictions, eval.json, eval.md file names of `split`: eval.json for val, eval-train.json for train."""
    if split == MAIN_SPLIT:
        return RUN_OUTPUTS
    return tuple(f"{Path(name).stem}-{split}{Path(name).suffix}" for name in RUN_OUTPUTS)


def check_run_folder(run_dir: Path, adapter_dir: Path | None) -> tuple[Path, Path]:
    """(config path, adapter folder) of a finished run, or a RunFolderError saying what is missing."""
    from engine.lora import ADAPTER_WEIGHTS

    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: no such run folder; pass the output_dir of a training run "
                             "(it holds config.yaml, adapter/, metrics.jsonl)")
    config_path = run_dir / RUN_CONFIG_FILE
    if not config_path.is_file():
        raise RunFolderError(f"{run_dir}: has no {RUN_CONFIG_FILE}, so it is not a run folder written by "
                             "engine/train.py; pass the run's output_dir")
    adapter_dir = adapter_dir or run_dir / RUN_ADAPTER_DIR
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise RunFolderError(
            f"{adapter_dir}: no {ADAPTER_WEIGHTS}; the adapter is exported when training ends: let the run "
            f"finish, or evaluate a checkpoint with --adapter {run_dir}/checkpoints/step_XXXXXXXX/adapter")
    return config_path, adapter_dir


def _config_for_split(cfg, split: str):
    """Point data.val at the split's shards: the validator reads data.val."""
    if split == "train":
        from loaders.sources import resolve_sources

        urls = [url for source in resolve_sources(cfg.data, "train") for url in source]
        cfg.data = dataclasses.replace(cfg.data, val=urls)
    return cfg


def generate_with_run(cfg, env, run_dir: Path, adapter_dir: Path, *, split: str,
                      max_samples: int | None) -> list[dict]:
    """Greedy predictions of the run's model + adapter on a split (every rank gets them all)."""
    import torch

    from engine.lora import load_adapter_into
    from engine.model import build_model
    from engine.parallel import apply_parallelism
    from engine.runner import build_tokenizer, resolve_impls
    from engine.validation import Validator

    resolve_impls(cfg, env)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg.model, cfg.lora, cfg.loss, tokenizer, env.device)
    load_adapter_into(model, adapter_dir)  # into the unsharded model, before FSDP
    apply_parallelism(model, gradient_checkpointing=False, compile=False, device=env.device)
    validator = Validator(cfg, env, model, tokenizer, max_generated=max_samples or sys.maxsize)
    if not validator.enabled:
        raise RunFolderError(f"{run_dir}: nothing to evaluate on the {split} split ({validator.disabled_reason}); "
                             "give shards with data.val=... after the run folder, or use --split train")
    model.eval()
    with torch.no_grad():
        records, _ = validator.generate()
    return records


def write_run_evaluation(run_dir: Path, records: list[dict], metrics_by_task: dict[str, dict],
                         split: str, max_samples: int | None = None, adapter_dir: Path | None = None) -> list[Path]:
    """predictions, eval.json ({"split", "n_samples", "n_samples_per_task", "max_samples", "adapter",
    "metrics": {task: {...}}}) and eval.md of `split`, named by run_output_names."""
    paths = [run_dir / name for name in run_output_names(split)]
    with open(paths[0], "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps({field: record[field] for field in ("task", "key", "prediction", "reference")},
                               ensure_ascii=False) + "\n")
    per_task = {task: sum(1 for r in records if r["task"] == task) for task in TASKS}
    document = {"split": split, "n_samples": len(records),
                "n_samples_per_task": {task: n for task, n in per_task.items() if n},
                "max_samples": max_samples, "adapter": str(adapter_dir) if adapter_dir else None,
                "metrics": metrics_by_task}
    paths[1].write_text(json.dumps(document, ensure_ascii=False, indent=2), encoding="utf-8")
    limit = f" (--max-samples {max_samples})" if max_samples else ""
    header = (f"# Evaluation of {run_dir.name}\n\n{len(records)} {split} samples{limit}, greedy decoding; "
              f"predictions in {paths[0].name}\n\n")
    paths[2].write_text(header + metrics_markdown(metrics_by_task), encoding="utf-8")
    return paths


def run_label_sets(args: argparse.Namespace, cfg) -> dict[str, list[str]]:
    """--run: the run's own closed label sets (its config.yaml), unless the command line gives others."""
    return closed_label_sets(args.dialects or cfg.data.dialects, args.emotions or cfg.data.emotions)


def evaluate_run(args: argparse.Namespace) -> dict[str, dict] | None:
    """--run: generate, score, write the files (main rank); returns the metrics there, else None."""
    from engine.config import check_repeated_keys, load_config
    from engine.parallel import close_distributed, init_distributed

    if args.max_samples is not None and args.max_samples < 1:
        raise RunFolderError(f"--max-samples {args.max_samples}: give a positive number, or leave it out for all")
    config_path, adapter_dir = check_run_folder(args.run, args.adapter)
    for note in check_repeated_keys(args.overrides):
        print(f"note: {note}", file=sys.stderr)
    cfg = _config_for_split(load_config(str(config_path), list(args.overrides)), args.split)
    env = init_distributed()
    try:
        records = generate_with_run(cfg, env, args.run, adapter_dir, split=args.split, max_samples=args.max_samples)
        if not env.is_main:
            return None
        labels = run_label_sets(args, cfg)
        metrics_by_task = score_records([PredictionRecord(r["task"], r["prediction"], r["reference"])
                                         for r in records], labels, taa_marbuta=args.taa_marbuta)
        for path in write_run_evaluation(args.run, records, metrics_by_task, args.split, args.max_samples,
                                         adapter_dir):
            print(f"wrote {path}", file=sys.stderr)
        return metrics_by_task
    finally:
        # Every rank waits here until the main rank has written the files: ranks leave together.
        close_distributed()


# --- command line

def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.evaluate",
        description=("Score predictions (from a file, or generated with a trained run): WER/CER (asr), "
                     "ROUGE (sum), accuracy/macro-F1 (did, ser)."))
    # Each way of obtaining predictions is one option of this group and one branch in main().
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path, metavar="FILE.jsonl",
                        help="JSON lines with task, prediction, reference")
    source.add_argument("--run", type=Path, metavar="RUN_DIR",
                        help="generate with a trained run's model and adapter, then score")
    parser.add_argument("--split", choices=("val", "train"), default="val",
                        help="--run: the shards to generate on (default: val, i.e. data.val)")
    parser.add_argument("--max-samples", type=int, metavar="N",
                        help="--run: generate for at most N samples, tasks taking turns (default: all)")
    parser.add_argument("--adapter", type=Path, metavar="DIR",
                        help="--run: adapter folder (default: RUN_DIR/adapter)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="--run: settings over the run's config.yaml, e.g. data.val=/data/val-{0..3}.tar")
    parser.add_argument("--dialects", nargs="+", metavar="LABEL",
                        help=f"closed label set of did (default: --run: the run's data.dialects; "
                             f"--predictions: {' '.join(DEFAULT_DIALECTS)})")
    parser.add_argument("--emotions", nargs="+", metavar="LABEL",
                        help=f"closed label set of ser (default: --run: the run's data.emotions; "
                             f"--predictions: {' '.join(DEFAULT_EMOTIONS)})")
    parser.add_argument("--taa-marbuta", choices=TAA_MARBUTA_OPTIONS, default="keep",
                        help="keep ة, or map it to ه before comparing (default: keep)")
    return parser


def _warn_unknown_references(metrics_by_task: dict[str, dict]) -> None:
    for task, metrics in metrics_by_task.items():
        if metrics.get("n_unknown_reference"):
            print(f"warning: {metrics['n_unknown_reference']} {task} reference(s) are not in "
                  f"the label set and were not scored (e.g. {metrics['unknown_references']}); "
                  f"pass the label set with --{'dialects' if task == 'did' else 'emotions'}",
                  file=sys.stderr)


def evaluate_prediction_file(args: argparse.Namespace) -> dict[str, dict]:
    records = read_prediction_file(args.predictions)
    return score_records(records, closed_label_sets(args.dialects, args.emotions),
                         taa_marbuta=args.taa_marbuta)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    if args.predictions is not None and args.overrides:
        parser.error(f"key=value settings ({' '.join(args.overrides)}) apply to --run only")
    try:
        metrics_by_task = evaluate_prediction_file(args) if args.predictions else evaluate_run(args)
    # ValueError covers PredictionFileError, RunFolderError and engine.config.ConfigError.
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if metrics_by_task is None:  # a rank other than the main one under torchrun
        return 0
    _warn_unknown_references(metrics_by_task)
    print(json.dumps(metrics_by_task, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
