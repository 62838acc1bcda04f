"""Scoring of generated answers: WER/CER (asr), ROUGE (sum), accuracy/macro-F1 (did, ser).

``score(task, predictions, references, labels=None)`` is the one entry point the trainer's
validation and the command line share. All text is compared after ``normalize_arabic``
(engine/arabic_text.py); ASR also reports the raw (unnormalized) WER/CER next to it.
Rates are fractions (0.25 means 25 %), never percentages.

Defined behaviour at the edges (none of these raise):
- asr: WER = (S + D + I) / (reference words over all pairs), computed over the whole set
  (jiwer's corpus WER, not a mean of per-sentence rates). An empty reference with a non-empty
  prediction adds every predicted word as an insertion. When no reference has any word the
  denominator is taken as 1, so WER is then the number of inserted words: 0 when every
  prediction is empty too. CER is the same over characters, spaces included (jiwer's CER).
- sum: ROUGE-1/2/L F-measure per pair, averaged over pairs. A pair whose prediction and
  reference are both empty after normalization scores 1 (they are equal); a pair where only
  one side is empty scores 0.
- did/ser: the prediction and reference are normalized and looked up in the closed label
  set. A prediction that is not a label (an empty one included) is wrong and counted in
  ``invalid_rate``; it is a miss for the reference's label, not a false alarm for any label.
  A reference that is not a label (data outside the recipe's label set, or empty) cannot be
  scored: the pair is left out of every rate and counted in ``n_unknown_reference`` (with
  the distinct values in ``unknown_references``), so n = n_scored + n_unknown_reference.
  macro_f1 averages per-label F1 over the labels of the closed set that occur among the
  scored references or valid predictions (``macro_f1_labels``); labels in neither are left
  out, since their F1 is undefined, not 0.
- no pairs at all: ``n`` is 0 and every rate is None.

Command line:
- ``python -m engine.evaluate --predictions FILE.jsonl`` scores a JSON-lines file whose lines
  hold ``task``, ``prediction`` and ``reference`` and prints a JSON object of metrics per task.
  A bad line stops it with the line number and the problem (exit code 2).
- ``python -m engine.evaluate --run RUN_DIR [--split val|train] [--max-samples N]
  [--adapter DIR] [key=value ...]`` loads the run's config.yaml (plus overrides, e.g.
  ``data.val=...``), builds its model, loads its adapter (RUN_DIR/adapter unless --adapter),
  generates greedily in batches on the split's shards (all samples unless --max-samples) and
  writes predictions.jsonl (task, key, prediction, reference), eval.json (metrics per task)
  and eval.md into RUN_DIR. Under torchrun the samples are split across ranks
  (``torchrun --nproc_per_node=2 -m engine.evaluate -- --run RUN_DIR``: the ``--`` keeps
  torchrun from taking ``--run`` for an abbreviation of its own ``--run-path``). Generation is
  engine.validation's lockstep greedy decoding, the same code that validates during training.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import jiwer
from rouge_score import rouge_scorer

from engine.arabic_text import TAA_MARBUTA_OPTIONS, ArabicRougeTokenizer, normalize_arabic
from loaders.tasks import DEFAULT_DIALECTS, DEFAULT_EMOTIONS, TASKS

LABEL_TASKS = ("did", "ser")
INVALID_COLUMN = "<invalid>"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# How many distinct unknown reference values to list in the output (enough to spot a typo).
MAX_LISTED_UNKNOWN_REFERENCES = 10


# --- input checks

def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: "
            "each prediction needs the reference it is scored against"
        )
    for side, texts in (("prediction", predictions), ("reference", references)):
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{side} {index} is a {type(text).__name__}, expected a str")


def _normalized(texts: Sequence[str], taa_marbuta: str) -> list[str]:
    return [normalize_arabic(text, taa_marbuta=taa_marbuta) for text in texts]


def _count_empty(texts: Sequence[str]) -> int:
    return sum(1 for text in texts if not text.strip())


# --- asr

def _error_rate(output, unit: str) -> dict:
    """Corpus error rate and its counts from a jiwer WordOutput / CharacterOutput."""
    reference_units = output.hits + output.substitutions + output.deletions
    errors = output.substitutions + output.deletions + output.insertions
    return {
        "rate": errors / max(reference_units, 1),
        f"reference_{unit}": reference_units,
        "substitutions": output.substitutions,
        "deletions": output.deletions,
        "insertions": output.insertions,
    }


def score_transcripts(predictions: Sequence[str], references: Sequence[str],
                      taa_marbuta: str = "keep") -> dict:
    """WER and CER on normalized text, and the same on the raw text."""
    if not predictions:
        return {"n": 0, "wer": None, "cer": None, "wer_raw": None, "cer_raw": None}
    normal_predictions = _normalized(predictions, taa_marbuta)
    normal_references = _normalized(references, taa_marbuta)
    words = _error_rate(jiwer.process_words(normal_references, normal_predictions), "words")
    characters = _error_rate(
        jiwer.process_characters(normal_references, normal_predictions), "characters")
    raw_words = _error_rate(jiwer.process_words(list(references), list(predictions)), "words")
    raw_characters = _error_rate(
        jiwer.process_characters(list(references), list(predictions)), "characters")
    return {
        "n": len(predictions),
        "wer": words["rate"],
        "cer": characters["rate"],
        "wer_raw": raw_words["rate"],
        "cer_raw": raw_characters["rate"],
        "reference_words": words["reference_words"],
        "substitutions": words["substitutions"],
        "deletions": words["deletions"],
        "insertions": words["insertions"],
        "n_empty_prediction": _count_empty(normal_predictions),
        "n_empty_reference": _count_empty(normal_references),
    }


# --- sum

def score_summaries(predictions: Sequence[str], references: Sequence[str],
                    taa_marbuta: str = "keep") -> dict:
    """Mean ROUGE-1/2/L F-measure over pairs, with a tokenizer that keeps Arabic words."""
    if not predictions:
        return {"n": 0, **{rouge_type: None for rouge_type in ROUGE_TYPES}}
    scorer = rouge_scorer.RougeScorer(
        list(ROUGE_TYPES), tokenizer=ArabicRougeTokenizer(taa_marbuta=taa_marbuta))
    normal_predictions = _normalized(predictions, taa_marbuta)
    normal_references = _normalized(references, taa_marbuta)
    totals = {rouge_type: 0.0 for rouge_type in ROUGE_TYPES}
    for prediction, reference in zip(normal_predictions, normal_references):
        if not prediction and not reference:
            pair_scores = {rouge_type: 1.0 for rouge_type in ROUGE_TYPES}
        else:
            scores = scorer.score(reference, prediction)  # rouge-score: (target, prediction)
            pair_scores = {rouge_type: scores[rouge_type].fmeasure for rouge_type in ROUGE_TYPES}
        for rouge_type in ROUGE_TYPES:
            totals[rouge_type] += pair_scores[rouge_type]
    return {
        "n": len(predictions),
        **{rouge_type: totals[rouge_type] / len(predictions) for rouge_type in ROUGE_TYPES},
        "n_empty_prediction": _count_empty(normal_predictions),
        "n_empty_reference": _count_empty(normal_references),
    }


# --- did / ser

def _label_lookup(labels: Sequence[str], taa_marbuta: str) -> dict[str, str]:
    """Normalized form -> label as the recipe spells it."""
    lookup: dict[str, str] = {}
    for label in labels:
        if not isinstance(label, str):
            raise TypeError(f"label {label!r} is a {type(label).__name__}, expected a str")
        key = normalize_arabic(label, taa_marbuta=taa_marbuta)
        if not key:
            raise ValueError(f"label {label!r} is empty after normalization; fix the label set")
        if key in lookup:
            raise ValueError(
                f"labels {lookup[key]!r} and {label!r} are the same after normalization "
                f"({key!r}); a prediction could not tell them apart: rename one")
        lookup[key] = label
    return lookup


def _per_label_scores(labels: Sequence[str], confusion: dict[str, dict[str, int]]) -> dict:
    per_label = {}
    for label in labels:
        true_positives = confusion[label][label]
        support = sum(confusion[label].values())
        predicted = sum(confusion[reference][label] for reference in labels)
        precision = true_positives / predicted if predicted else 0.0
        recall = true_positives / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1,
                            "support": support, "predicted": predicted}
    return per_label


def score_labels(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str],
                 taa_marbuta: str = "keep") -> dict:
    """Accuracy, macro-F1, invalid rate and confusion matrix over a closed label set."""
    lookup = _label_lookup(labels, taa_marbuta)
    labels = list(lookup.values())
    columns = labels + [INVALID_COLUMN]
    confusion = {label: {column: 0 for column in columns} for label in labels}
    unknown_references: list[str] = []
    n_unknown_reference = 0
    n_empty_prediction = 0
    for prediction, reference in zip(predictions, references):
        reference_label = lookup.get(normalize_arabic(reference, taa_marbuta=taa_marbuta))
        if reference_label is None:
            n_unknown_reference += 1
            if (reference not in unknown_references
                    and len(unknown_references) < MAX_LISTED_UNKNOWN_REFERENCES):
                unknown_references.append(reference)
            continue
        normal_prediction = normalize_arabic(prediction, taa_marbuta=taa_marbuta)
        n_empty_prediction += not normal_prediction
        confusion[reference_label][lookup.get(normal_prediction, INVALID_COLUMN)] += 1

    n_scored = len(predictions) - n_unknown_reference
    per_label = _per_label_scores(labels, confusion)
    macro_labels = [label for label in labels
                    if per_label[label]["support"] or per_label[label]["predicted"]]
    correct = sum(confusion[label][label] for label in labels)
    invalid = sum(confusion[label][INVALID_COLUMN] for label in labels)
    return {
        "n": len(predictions),
        "n_scored": n_scored,
        "accuracy": correct / n_scored if n_scored else None,
        "macro_f1": (sum(per_label[label]["f1"] for label in macro_labels) / len(macro_labels)
                     if macro_labels else None),
        "invalid_rate": invalid / n_scored if n_scored else None,
        "n_invalid": invalid,
        "n_empty_prediction": n_empty_prediction,
        "n_unknown_reference": n_unknown_reference,
        "unknown_references": unknown_references,
        "macro_f1_labels": macro_labels,
        "per_label": per_label,
        "confusion": {"rows": labels, "columns": columns,
                      "matrix": [[confusion[label][column] for column in columns]
                                 for label in labels]},
    }


# --- one entry point

def score(task: str, predictions: Sequence[str], references: Sequence[str],
          labels: Sequence[str] | None = None, taa_marbuta: str = "keep") -> dict:
    """Metrics of one task's predictions against its references (see the module docstring).

    ``labels`` is the closed label set, required for did and ser and ignored otherwise.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if taa_marbuta not in TAA_MARBUTA_OPTIONS:
        raise ValueError(
            f"taa_marbuta={taa_marbuta!r} is not an option; use one of {TAA_MARBUTA_OPTIONS}")
    _check_pairs(predictions, references)
    if task == "asr":
        return score_transcripts(predictions, references, taa_marbuta)
    if task == "sum":
        return score_summaries(predictions, references, taa_marbuta)
    if not labels:
        raise ValueError(
            f"task {task!r} is scored against a closed label set: pass labels= "
            "(the recipe's data.dialects or data.emotions)")
    return score_labels(predictions, references, labels, taa_marbuta)


def closed_label_sets(dialects: Sequence[str] | None = None,
                      emotions: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Label sets of did and ser: the given ones, else the recipe defaults."""
    return {"did": list(dialects or DEFAULT_DIALECTS), "ser": list(emotions or DEFAULT_EMOTIONS)}


# --- prediction files (JSON lines: task, prediction, reference)

@dataclass(frozen=True)
class PredictionRecord:
    task: str
    prediction: str
    reference: str
    line_number: int = 0


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


def score_records(records: Iterable[PredictionRecord], label_sets: dict[str, list[str]],
                  taa_marbuta: str = "keep") -> dict[str, dict]:
    """Metrics per task (in TASKS order) for the tasks that occur in ``records``."""
    by_task: dict[str, list[PredictionRecord]] = {}
    for record in records:
        by_task.setdefault(record.task, []).append(record)
    return {
        task: score(task, [record.prediction for record in by_task[task]],
                    [record.reference for record in by_task[task]],
                    labels=label_sets.get(task), taa_marbuta=taa_marbuta)
        for task in TASKS if task in by_task
    }


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
                         split: str) -> list[Path]:
    paths = [run_dir / name for name in RUN_OUTPUTS]
    with open(paths[0], "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps({field: record[field] for field in ("task", "key", "prediction", "reference")},
                               ensure_ascii=False) + "\n")
    paths[1].write_text(json.dumps(metrics_by_task, ensure_ascii=False, indent=2), encoding="utf-8")
    header = (f"# Evaluation of {run_dir.name}\n\n{len(records)} {split} samples, greedy decoding; "
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
        for path in write_run_evaluation(args.run, records, metrics_by_task, args.split):
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
