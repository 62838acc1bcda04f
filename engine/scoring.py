"""Scoring of generated answers: WER/CER (asr), ROUGE (sum), accuracy/macro-F1 (did, ser).

``score(task, predictions, references, labels=None)`` is the one entry point the trainer's
validation and the command line (engine/evaluate.py) share; ``score_records`` applies it per
task to ``PredictionRecord``s. All text is compared after ``normalize_arabic``
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
"""
from __future__ import annotations

from dataclasses import dataclass
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


# --- scored records (one per prediction, e.g. a line of a predictions file)

@dataclass(frozen=True)
class PredictionRecord:
    task: str
    prediction: str
    reference: str
    line_number: int = 0


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
