"""Compare training runs: a Markdown table and PNG plots against tokens seen.

    python -m engine.report runs/random-... runs/hybrid-... --out reports/compare

Each run folder holds config.yaml (its ``recipe``), metrics.jsonl (training rows, ``"event":
"stage"`` rows at curriculum stage boundaries, ``"event": "eval"`` rows) and summary.json,
and optionally eval.json (metrics of the generation pass of ``engine.evaluate --run`` on the
validation split, per task, with the split and the sample count; another split's results are
in eval-<split>.json, which the report does not read). The report writes into --out:

- report.md: one row per run with recipe, status (finished, or STOPPED at step k of
  max_steps and by what), steps, tokens, tokens/s, final WER/CER, ROUGE-L,
  DID/SER macro-F1 and the per-task validation loss (best value per column in bold), then
  the final training loss per task, then the plots.
- train_loss.png, val_loss.png: per-task training / validation loss vs tokens.
- eval_<task>.png: each generation metric of the task vs tokens (and, for did/ser, the
  teacher-forced label accuracy); a star marks eval.json's value at the run's final tokens.

Every plot marks the curriculum stage boundaries of each run as dotted vertical lines in the
run's colour. Eval metrics in the table come from eval.json when present, else from the last
eval row, else from summary.json's ``eval``; the table says which.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from loaders.tasks import TASKS

# Generation metrics plotted per task, and whether lower is better (for bold in the table).
PLOTTED_METRICS = {
    "asr": ("wer", "cer", "wer_raw", "cer_raw"),
    "sum": ("rouge1", "rouge2", "rougeL"),
    "did": ("accuracy", "macro_f1", "invalid_rate"),
    "ser": ("accuracy", "macro_f1", "invalid_rate"),
}
LABEL_ACCURACY_TASKS = ("did", "ser")
FIGURE_DPI = 110
RUN_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
              "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


class ReportError(ValueError):
    """A run folder the report cannot read; the message names the run and the file."""


@dataclass
class RunRecord:
    directory: Path
    label: str
    recipe: str
    summary: dict
    train_rows: list[dict] = field(default_factory=list)
    stage_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    final_eval: dict | None = None  # eval.json, metrics per task
    final_eval_source: str = "eval.json"  # where final_eval comes from, with its split and sample count
    budget: dict = field(default_factory=dict)  # config.yaml's max_steps / max_tokens (0: not set)


# --- reading a run folder

def _required_file(run_dir: Path, name: str) -> Path:
    path = run_dir / name
    if not path.is_file():
        raise ReportError(f"run {run_dir}: {name} not found (expected {path}); the engine writes "
                          f"it into every run folder: check the path, or let the run finish")
    return path


def _read_json_object(run_dir: Path, path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"run {run_dir}: {path.name} is not valid JSON "
                          f"(line {error.lineno}: {error.msg})") from None
    if not isinstance(value, dict):
        raise ReportError(f"run {run_dir}: {path.name} must hold a JSON object, "
                          f"got {type(value).__name__}")
    return value


def _read_config(run_dir: Path) -> dict:
    path = _required_file(run_dir, "config.yaml")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ReportError(f"run {run_dir}: config.yaml is not valid YAML ({error})") from None
    if not isinstance(config, dict):
        raise ReportError(f"run {run_dir}: config.yaml must be a mapping of settings")
    return config


def _read_recipe(run_dir: Path, config: dict) -> str:
    for key in ("recipe", "name"):
        if isinstance(config.get(key), str) and config[key]:
            return config[key]
    raise ReportError(f"run {run_dir}: config.yaml has no 'recipe' (or 'name') key naming "
                      f"the recipe; add e.g. 'recipe: hybrid'")


def _read_metrics_rows(run_dir: Path, run: RunRecord) -> None:
    path = _required_file(run_dir, "metrics.jsonl")
    for line_number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise ReportError(
                f"run {run_dir}: metrics.jsonl line {line_number} is not valid JSON "
                f"({error.msg}); a run stopped mid-write leaves a cut last line: delete it") from None
        if not isinstance(row, dict):
            raise ReportError(f"run {run_dir}: metrics.jsonl line {line_number} is not a JSON object")
        if "tokens" not in row:
            raise ReportError(f"run {run_dir}: metrics.jsonl line {line_number} has no 'tokens'")
        event = row.get("event")
        if event == "stage":
            run.stage_rows.append(row)
        elif event == "eval":
            run.eval_rows.append(row)
        elif event is None:
            run.train_rows.append(row)
        # Other events (e.g. checkpoint notices) carry nothing the report plots.


def load_run(run_dir: str | Path) -> RunRecord:
    """Read one run folder (see the module docstring for the files)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run {run_dir}: folder not found")
    config = _read_config(run_dir)
    run = RunRecord(directory=run_dir, label=run_dir.name, recipe=_read_recipe(run_dir, config),
                    summary=_read_json_object(run_dir, _required_file(run_dir, "summary.json")),
                    budget={key: config.get(key) for key in ("max_steps", "max_tokens")})
    _read_metrics_rows(run_dir, run)
    eval_path = run_dir / "eval.json"
    if eval_path.is_file():
        final_eval = _read_json_object(run_dir, eval_path)
        run.final_eval = final_eval.get("metrics", final_eval)
        run.final_eval_source = eval_source(final_eval)
    return run


def eval_source(document: dict) -> str:
    """"eval.json (val, 200 samples)"; the split in capitals where it is not val (eval.json written by
    an older engine's --split train); plain "eval.json" for a file that records neither."""
    split, n = document.get("split"), document.get("n_samples")
    if split is None and n is None:
        return "eval.json"
    where = "val" if split == "val" else f"{str(split).upper()} split, not val"
    limit = f", --max-samples {document['max_samples']}" if document.get("max_samples") else ""
    return f"eval.json ({where}, {n if n is not None else '?'} samples{limit})"


def _unique_labels(runs: list[RunRecord]) -> None:
    """Folder names label the runs; fall back to full paths where two names clash."""
    names = [run.label for run in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.label = str(run.directory)


# --- numbers for the table

def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def final_eval_metrics(run: RunRecord) -> tuple[dict, str]:
    """Eval metrics per task and where they come from."""
    if run.final_eval:
        return run.final_eval, run.final_eval_source
    for row in reversed(run.eval_rows):
        if row.get("metrics"):
            return row["metrics"], f"eval @ step {row.get('step', '?')}"
    if run.summary.get("eval"):
        return run.summary["eval"], "summary.json"
    return {}, "none"


def run_status(run: RunRecord) -> str:
    """"finished", or how far a run that stopped before its end got and why: "STOPPED at step 2 of 4
    (SIGTERM)". A summary without stopped_by (an older engine's) is judged by its steps alone."""
    summary = run.summary
    max_steps = _number(summary.get("max_steps") or run.budget.get("max_steps")) or 0
    max_tokens = _number(summary.get("max_tokens") or run.budget.get("max_tokens")) or 0
    steps, tokens = _number(summary.get("steps")) or 0, _number(summary.get("tokens")) or 0
    short = (max_steps > 0 and steps < max_steps) or (max_tokens > 0 and tokens < max_tokens)
    if not summary.get("stopped_by") and not short:
        return "finished"
    if max_steps > 0:
        where = f"at step {int(steps):,} of {int(max_steps):,}"
    elif max_tokens > 0:
        where = f"at {int(tokens):,} of {int(max_tokens):,} tokens"
    else:
        where = f"at step {int(steps):,}"
    reason = f" ({summary['stopped_by']})" if summary.get("stopped_by") else ""
    return f"STOPPED {where}{reason}"


def latest_val_loss(run: RunRecord) -> dict:
    for row in reversed(run.eval_rows):
        if row.get("val_loss"):
            return row["val_loss"]
    return {}


# Table columns: header, how to get the value from a run, which direction is better.
_Column = tuple[str, Callable[[RunRecord], float | None], str | None]


def _metric_column(header: str, task: str, metric: str, better: str) -> _Column:
    def value_of(run: RunRecord) -> float | None:
        task_metrics = final_eval_metrics(run)[0].get(task)
        return _number(task_metrics.get(metric)) if isinstance(task_metrics, dict) else None
    return header, value_of, better


def _table_columns() -> list[_Column]:
    columns: list[_Column] = [
        ("steps", lambda run: _number(run.summary.get("steps")), None),
        ("tokens", lambda run: _number(run.summary.get("tokens")), None),
        ("tokens/s", lambda run: _number(run.summary.get("tokens_per_sec")), "higher"),
        *[_metric_column(header, task, metric, better) for header, task, metric, better in (
            ("WER", "asr", "wer", "lower"), ("CER", "asr", "cer", "lower"),
            ("ROUGE-L", "sum", "rougeL", "higher"),
            ("DID macro-F1", "did", "macro_f1", "higher"),
            ("SER macro-F1", "ser", "macro_f1", "higher"))],
    ]
    for task in TASKS:
        columns.append((f"val loss {task}",
                        lambda run, task=task: _number(latest_val_loss(run).get(task)), "lower"))
    return columns


def _format_cell(header: str, value: float | None) -> str:
    if value is None:
        return "—"
    if header in ("steps", "tokens"):
        return f"{int(value):,}"
    if header == "tokens/s":
        return f"{value:,.1f}"
    return f"{value:.4f}"


def _best_value(values: list[float | None], better: str | None) -> float | None:
    present = [value for value in values if value is not None]
    if better is None or len(set(present)) < 2:  # nothing to choose between
        return None
    return min(present) if better == "lower" else max(present)


def comparison_table(runs: list[RunRecord]) -> str:
    columns = _table_columns()
    headers = ["run", "recipe", "status", *[header for header, _, _ in columns], "eval metrics from"]
    values = [[getter(run) for _, getter, _ in columns] for run in runs]
    best = [_best_value([row[index] for row in values], better)
            for index, (_, _, better) in enumerate(columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for run, row in zip(runs, values):
        cells = []
        for index, (header, _, _) in enumerate(columns):
            text = _format_cell(header, row[index])
            cells.append(f"**{text}**" if row[index] is not None and row[index] == best[index]
                         else text)
        lines.append("| " + " | ".join([run.label, run.recipe, run_status(run), *cells,
                                         final_eval_metrics(run)[1]]) + " |")
    stopped = [run.label for run in runs if run_status(run) != "finished"]
    if stopped:
        lines += ["", f"Stopped before the end of the run (resume it with the same command): {', '.join(stopped)}; "
                      "its numbers are those of the steps done."]
    return "\n".join(lines)


def training_loss_table(runs: list[RunRecord]) -> str:
    lines = ["| run | " + " | ".join(f"train loss {task}" for task in TASKS) + " |",
             "|" + "---|" * (len(TASKS) + 1)]
    for run in runs:
        final = run.summary.get("final_loss_per_task") or {}
        lines.append(f"| {run.label} | " + " | ".join(
            _format_cell("loss", _number(final.get(task))) for task in TASKS) + " |")
    return "\n".join(lines)


# --- plots

def _series(rows: list[dict], value_of: Callable[[dict], object]) -> tuple[list, list]:
    xs, ys = [], []
    for row in rows:
        value = _number(value_of(row))
        if value is not None and _number(row.get("tokens")) is not None:
            xs.append(row["tokens"])
            ys.append(value)
    return xs, ys


def _mark_stages(axes, run: RunRecord, color: str) -> None:
    """A dotted line where each stage after the first begins, labelled with the stage name."""
    for row in run.stage_rows:
        tokens = _number(row.get("tokens"))
        if tokens is not None and tokens > 0:
            axes.axvline(tokens, color=color, linestyle=":", linewidth=1.2, alpha=0.8)
            axes.text(tokens, 0.98, f" {row.get('stage', '')}", color=color, fontsize=7,
                      rotation=90, ha="right", va="top", transform=axes.get_xaxis_transform())


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=FIGURE_DPI)
    return path


def _panel_grid(panel_titles: Sequence[str], title: str) -> tuple[Figure, list]:
    columns = 2 if len(panel_titles) > 1 else 1
    rows = math.ceil(len(panel_titles) / columns)
    figure = Figure(figsize=(6.0 * columns, 3.6 * rows), layout="constrained")
    figure.suptitle(f"{title}  (dotted lines: curriculum stage boundaries)")
    axes_list = []
    for index, panel_title in enumerate(panel_titles):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.set_title(panel_title)
        axes.set_xlabel("tokens seen")
        axes.xaxis.set_major_formatter(EngFormatter())
        axes.grid(alpha=0.3)
        axes_list.append(axes)
    return figure, axes_list


def _plot_panels(runs: list[RunRecord], panels: Sequence[tuple[str, Callable]],
                 title: str, ylabel: str, path: Path, marker: str | None) -> Path | None:
    """One panel per (title, series_of(run) -> (xs, ys, final_point)); None if no data."""
    figure, axes_list = _panel_grid([panel_title for panel_title, _ in panels], title)
    plotted_any = False
    for axes, (_, series_of) in zip(axes_list, panels):
        has_data = False
        for index, run in enumerate(runs):
            color = RUN_COLORS[index % len(RUN_COLORS)]
            xs, ys, final_point = series_of(run)
            if xs:
                axes.plot(xs, ys, color=color, marker=marker, label=f"{run.label} ({run.recipe})")
            if final_point is not None:
                axes.plot(*final_point, color=color, marker="*", markersize=12, linestyle="none",
                          label=f"{run.label}: after training (eval.json)")
            if xs or final_point is not None:
                has_data = True
                _mark_stages(axes, run, color)
        if has_data:
            axes.set_ylabel(ylabel)
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
        plotted_any = plotted_any or has_data
    return _save(figure, path) if plotted_any else None


def plot_training_loss(runs: list[RunRecord], out_dir: Path) -> Path | None:
    panels = [(task, lambda run, task=task: (
        *_series(run.train_rows, lambda row: (row.get("loss_per_task") or {}).get(task)), None))
        for task in TASKS]
    return _plot_panels(runs, panels, "Training loss per task", "loss",
                        out_dir / "train_loss.png", marker=None)


def plot_validation_loss(runs: list[RunRecord], out_dir: Path) -> Path | None:
    panels = [(task, lambda run, task=task: (
        *_series(run.eval_rows, lambda row: (row.get("val_loss") or {}).get(task)), None))
        for task in TASKS]
    return _plot_panels(runs, panels, "Validation loss per task (teacher-forced)", "loss",
                        out_dir / "val_loss.png", marker=".")


def _final_point(run: RunRecord, task: str, metric: str):
    value = _number(((run.final_eval or {}).get(task) or {}).get(metric))
    tokens = _number(run.summary.get("tokens"))
    return None if value is None or tokens is None else (tokens, value)


def plot_eval_metrics(runs: list[RunRecord], out_dir: Path) -> list[Path]:
    paths = []
    for task, metrics in PLOTTED_METRICS.items():
        panels = [(metric, lambda run, task=task, metric=metric: (
            *_series(run.eval_rows,
                     lambda row: ((row.get("metrics") or {}).get(task) or {}).get(metric)),
            _final_point(run, task, metric))) for metric in metrics]
        if task in LABEL_ACCURACY_TASKS:
            panels.append(("label accuracy (teacher-forced)", lambda run, task=task: (
                *_series(run.eval_rows, lambda row: (row.get("val_label_acc") or {}).get(task)),
                None)))
        path = _plot_panels(runs, panels, f"{task}: evaluation metrics", "value",
                            out_dir / f"eval_{task}.png", marker=".")
        if path is not None:
            paths.append(path)
    return paths


# --- the report

def make_out_dir(out_dir: Path) -> None:
    """--out: a folder (created if missing); a file, or a path that cannot be created, is a ReportError."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {out_dir} is a file, not a folder: the report writes report.md and PNG plots into "
                          "a folder; give a folder path (it is created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:   # a parent that is a file, no permission, a read-only disk
        raise ReportError(f"--out {out_dir}: cannot create the folder ({error.strerror or error}); give a folder "
                          "path you can write to") from None


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Read every run, write report.md and the plots into out_dir; returns report.md's path."""
    out_dir = Path(out_dir)
    runs = [load_run(run_dir) for run_dir in run_dirs]
    _unique_labels(runs)
    make_out_dir(out_dir)
    plots = [plot_training_loss(runs, out_dir), plot_validation_loss(runs, out_dir),
             *plot_eval_metrics(runs, out_dir)]
    plots = [path for path in plots if path is not None]
    lines = ["# Run comparison", "",
             "Runs: " + ", ".join(f"`{run.directory}`" for run in runs), "",
             "Best value per column in bold (lower WER/CER/loss, higher tokens/s, ROUGE, F1).",
             "", comparison_table(runs), "", "## Final training loss", "",
             training_loss_table(runs), "", "## Plots", ""]
    if not plots:
        lines.append("No plots: no run has training or eval rows in metrics.jsonl.")
    lines += [f"![{path.stem}]({path.name})" for path in plots]
    report_path = out_dir / "report.md"
    report_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.report",
        description="Compare runs: a Markdown table and loss/metric plots against tokens seen.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="folder for report.md and the PNG plots (created if missing)")
    args = parser.parse_args(argv)
    try:
        report_path = write_report(args.runs, args.out)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
