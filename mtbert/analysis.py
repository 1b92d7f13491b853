"""Error analysis of a model directory on labelled files: where and how it is wrong.

`mtbert analyze MODEL_DIR` runs the model over the labelled file of one split
(dev by default) of each of its tasks and writes into one directory:

- classification tasks (SST-5, QQP): the confusion matrix as counts and
  row-normalised (`<task>-confusion.png`), per-class precision, recall, F1
  and support, accuracy and macro-F1 (the unweighted mean of the per-class
  F1 scores over all classes of the task); for a binary task the most
  confident false positives and false negatives, for a multi-class task the
  most confident mistakes;
- regression tasks (STS-B): predicted against gold scores with the y = x line
  and Pearson and Spearman correlations (`<task>-scatter.png`), the mean
  absolute and mean signed error per gold score rounded to an integer
  (`<task>-error-by-gold.png`), and the examples with the largest absolute
  error;
- `analysis.md`, a report linking the figures with every table, and
  `analysis.json`, the same numbers for scripts.

Everything goes through the task's own `predict` and `probabilities`, so any
head that a task supports is analysed the same way.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr

from mtbert.data import Examples, read_examples
from mtbert.errors import DataError
from mtbert.evaluate import SetOutputs
from mtbert.formatting import markdown_table, save_figure
from mtbert.tasks import BinaryTask, RegressionTask, Task, get_task, overall_scores

log = logging.getLogger("mtbert")

REPORT = "analysis.md"
NUMBERS = "analysis.json"
MAX_TEXT = 160  # characters of an example's text shown in analysis.md (the JSON has all)


@dataclass
class Analysis:
    """What `analyze` wrote: the report, the numbers, the figures, and what was left out."""

    directory: Path
    numbers: dict[str, Any]
    figures: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def report(self) -> Path:
        return self.directory / REPORT


# ---------------------------------------------------------------- numbers

def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts: row = gold class, column = predicted class."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predictions.astype(np.int64)), 1)
    return matrix


def per_class_metrics(matrix: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class of a confusion matrix.

    A class that is never predicted has precision 0, one with no gold example
    recall 0, and F1 is 0 when precision and recall both are.
    """
    rows = []
    for k, name in enumerate(names):
        hits = int(matrix[k, k])
        predicted, support = int(matrix[:, k].sum()), int(matrix[k, :].sum())
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1,
                     "support": support})
    return rows


def _example(examples: Examples, i: int, **values: Any) -> dict[str, Any]:
    texts = dict(zip(examples.task.text_columns, examples.texts[i]))
    return {"id": examples.ids[i], **texts, **values}


def classification_numbers(examples: Examples, outputs: SetOutputs, top: int) -> dict[str, Any]:
    task = examples.task
    names = list(task.class_names) or [str(k) for k in range(max(task.num_outputs, 2))]
    gold = examples.labels.astype(np.int64)
    predicted = outputs.predictions.astype(np.int64)
    matrix = confusion_matrix(gold, predicted, len(names))
    classes = per_class_metrics(matrix, names)
    numbers: dict[str, Any] = {
        "accuracy": float(np.mean(gold == predicted)),
        "macro_f1": float(np.mean([c["f1"] for c in classes])),
        "classes": names,
        "confusion": matrix.tolist(),
        "per_class": classes,
    }
    probs = outputs.probabilities
    if probs is None:
        return numbers
    if isinstance(task, BinaryTask):
        positive = probs[:, 1]
        numbers.update({k: classes[1][k] for k in ("precision", "recall", "f1")})
        # Most confident first: a false positive by P(positive), a false negative by P(negative).
        fp = np.flatnonzero((gold == 0) & (predicted == 1))
        fn = np.flatnonzero((gold == 1) & (predicted == 0))
        fp = fp[np.argsort(-positive[fp], kind="stable")][:top]
        fn = fn[np.argsort(positive[fn], kind="stable")][:top]
        numbers["false_positives"] = [_example(examples, int(i), gold=0, predicted=1,
                                               probability=float(positive[i])) for i in fp]
        numbers["false_negatives"] = [_example(examples, int(i), gold=1, predicted=0,
                                               probability=float(positive[i])) for i in fn]
    else:
        wrong = np.flatnonzero(gold != predicted)
        confidence = probs[wrong, predicted[wrong]]
        order = wrong[np.argsort(-confidence, kind="stable")][:top]
        numbers["confident_errors"] = [
            _example(examples, int(i), gold=names[gold[i]], predicted=names[predicted[i]],
                     probability=float(probs[i, predicted[i]])) for i in order]
    return numbers


def gold_bins(task: RegressionTask, gold: np.ndarray) -> np.ndarray:
    """Each gold score rounded half up to an integer within the task's range."""
    return np.clip(np.floor(gold + 0.5), math.ceil(task.low), math.floor(task.high)).astype(int)


def regression_numbers(examples: Examples, outputs: SetOutputs, top: int) -> dict[str, Any]:
    task = examples.task
    gold = examples.labels.astype(np.float64)
    predicted = outputs.predictions.astype(np.float64)
    error = predicted - gold
    constant = len(gold) < 2 or np.std(predicted) == 0 or np.std(gold) == 0
    bins = gold_bins(task, gold)
    by_gold = []
    for b in range(math.ceil(task.low), math.floor(task.high) + 1):
        inside = bins == b
        if inside.any():
            by_gold.append({"gold": b, "examples": int(inside.sum()),
                            "mae": float(np.abs(error[inside]).mean()),
                            "mean_error": float(error[inside].mean())})
    worst = np.argsort(-np.abs(error), kind="stable")[:top]
    return {
        # Undefined for constant predictions (a collapsed model): 0, as in the training metric.
        "pearson": 0.0 if constant else float(pearsonr(predicted, gold)[0]),
        "spearman": 0.0 if constant else float(spearmanr(predicted, gold)[0]),
        "mae": float(np.abs(error).mean()),
        "rmse": float(np.sqrt((error ** 2).mean())),
        "prediction_range": [float(predicted.min()), float(predicted.max())],
        "error_by_gold": by_gold,
        "worst": [_example(examples, int(i), gold=float(gold[i]), predicted=float(predicted[i]),
                           error=float(error[i])) for i in worst],
    }


# ---------------------------------------------------------------- figures

def plot_confusion(task: Task, numbers: dict[str, Any], path: Path) -> Path:
    """Counts and row-normalised confusion matrices side by side, every cell annotated."""
    import matplotlib.pyplot as plt


    matrix = np.asarray(numbers["confusion"], dtype=float)
    names = numbers["classes"]
    n = len(names)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    side = max(3.4, 0.95 * n + 1.0)  # inches per panel: legible cells and tick labels
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2.2, 0.8 * side + 1.4),
                             layout="constrained")
    panels = ((axes[0], matrix, "counts", lambda v: f"{int(v)}", matrix.max() or 1.0),
              (axes[1], normalised, "row-normalised (recall per gold class)",
               lambda v: f"{v:.0%}", 1.0))
    for ax, values, title, fmt, top in panels:
        image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=top, aspect="auto")
        for i in range(n):
            for j in range(n):
                value = values[i, j]
                ax.text(j, i, fmt(value), ha="center", va="center", fontsize=10,
                        color="white" if value > 0.55 * top else "black")
            # The diagonal (correct predictions) framed.
            ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False,
                                       edgecolor="tab:orange", linewidth=1.5, clip_on=False))
        ax.set_xticks(range(n), names, rotation=30 if n > 2 else 0,
                      ha="right" if n > 2 else "center")
        ax.set_yticks(range(n), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{task.title}: confusion matrix, {numbers['examples']} examples\n"
                 f"accuracy {numbers['accuracy']:.3f}, macro-F1 {numbers['macro_f1']:.3f}",
                 fontsize=11)
    return save_figure(fig, path)


def plot_scatter(task: RegressionTask, examples: Examples, outputs: SetOutputs,
                 numbers: dict[str, Any], path: Path) -> Path:
    """Predicted against gold scores, with the y = x line of a perfect model."""
    import matplotlib.pyplot as plt


    gold, predicted = examples.labels, outputs.predictions
    low = min(task.low, float(predicted.min())) - 0.2
    high = max(task.high, float(predicted.max())) + 0.2
    fig, ax = plt.subplots(figsize=(6.2, 6.2))
    ax.scatter(gold, predicted, s=12, alpha=0.4, color="tab:blue", edgecolors="none",
               label=f"{len(gold)} examples")
    ax.plot([low, high], [low, high], color="tab:red", linewidth=1.2, label="y = x")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.set_xlabel(f"gold similarity ({task.low:g} to {task.high:g})")
    ax.set_ylabel("predicted similarity")
    ax.set_title(f"{task.title}\nPearson r = {numbers['pearson']:.3f}, Spearman ρ = "
                 f"{numbers['spearman']:.3f}, MAE = {numbers['mae']:.2f}", fontsize=10)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_error_by_gold(task: RegressionTask, numbers: dict[str, Any], path: Path) -> Path:
    """Mean absolute and mean signed error per rounded gold score, with the counts."""
    import matplotlib.pyplot as plt


    rows = numbers["error_by_gold"]
    bins = [r["gold"] for r in rows]
    mae = [r["mae"] for r in rows]
    bias = [r["mean_error"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.bar(bins, mae, width=0.6, color="tab:blue", alpha=0.75,
                  label="mean |predicted − gold|")
    ax.plot(bins, bias, marker="o", color="tab:orange", linewidth=1.5,
            label="mean (predicted − gold): + over-, − under-estimates")
    ax.axhline(0.0, color="black", linewidth=0.8)
    # Counts go under the ticks: above the bars they would collide with the bias line.
    ax.set_xticks(bins, [f"{b}\n(n={r['examples']})" for b, r in zip(bins, rows)])
    ax.set_xlabel("gold similarity, rounded to an integer")
    ax.set_ylabel("error (similarity points)")
    lowest = min([0.0, *bias])
    ax.set_ylim(lowest - 0.3 if lowest < 0 else 0.0, max([*mae, *bias]) * 1.25 + 0.1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{task.title}: error by gold score", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------- report

def _markdown_cell(value: Any) -> str:
    """A value in a Markdown cell: 4 decimals, or text on one line, escaped and shortened."""
    if isinstance(value, float):
        return f"{value:.4f}"
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return markdown_table(header, [[_markdown_cell(v) for v in row] for row in rows]) + [""]


def _examples_table(task: Task, items: list[dict[str, Any]], values: list[str]) -> list[str]:
    if not items:
        return ["None.", ""]
    header = ["id", *task.text_columns, *values]
    return _table(header, [[item[k] for k in header] for item in items])


def render_markdown(analysis: Analysis) -> str:
    numbers = analysis.numbers
    lines = [f"# Error analysis: {numbers['model']}", "",
             f"Split `{numbers['split']}`, files from `{numbers['data_dir']}`.", ""]
    if numbers["metrics"]:
        lines += _table(["metric", "value"], [[k, v] for k, v in numbers["metrics"].items()])
    for note in analysis.notes:
        lines += [f"> {note}", ""]
    for name, t in numbers["tasks"].items():
        task = get_task(name)
        lines += [f"## {t['title']} (`{name}`)", "",
                  f"`{t['file']}`: {t['examples']} examples scored, {t['skipped']} rows "
                  "skipped.", ""]
        for key, path in analysis.figures.items():
            if key.startswith(f"{name}-"):
                lines += [f"![{t['title']}: {key.split('-', 1)[1]}]({path.name})", ""]
        if "confusion" in t:
            classes = t["classes"]
            lines += [f"Accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}"
                      + (f"; `{classes[1]}` precision {t['precision']:.4f}, recall "
                         f"{t['recall']:.4f}, F1 {t['f1']:.4f}" if "precision" in t else "")
                      + ".", "", "Confusion matrix (rows gold, columns predicted):", ""]
            lines += _table(["gold \\ predicted", *classes],
                            [[c, *row] for c, row in zip(classes, t["confusion"])])
            lines += _table(["class", "precision", "recall", "F1", "support"],
                            [[c["class"], c["precision"], c["recall"], c["f1"], c["support"]]
                             for c in t["per_class"]])
            if "false_positives" in t:
                lines += [f"Most confident false positives (gold `{classes[0]}`, predicted "
                          f"`{classes[1]}`); probability = P({classes[1]}):", ""]
                lines += _examples_table(task, t["false_positives"], ["probability"])
                lines += [f"Most confident false negatives (gold `{classes[1]}`, predicted "
                          f"`{classes[0]}`); probability = P({classes[1]}):", ""]
                lines += _examples_table(task, t["false_negatives"], ["probability"])
            if "confident_errors" in t:
                lines += ["Most confident mistakes; probability = that of the predicted "
                          "class:", ""]
                lines += _examples_table(task, t["confident_errors"],
                                         ["gold", "predicted", "probability"])
        else:
            low, high = t["prediction_range"]
            lines += [f"Pearson {t['pearson']:.4f}, Spearman {t['spearman']:.4f}, MAE "
                      f"{t['mae']:.4f}, RMSE {t['rmse']:.4f}; predictions range from "
                      f"{low:.2f} to {high:.2f}.", "", "Error by gold score (rounded):", ""]
            lines += _table(["gold", "examples", "mean abs. error", "mean error"],
                            [[r["gold"], r["examples"], r["mae"], r["mean_error"]]
                             for r in t["error_by_gold"]])
            lines += ["Largest absolute errors:", ""]
            lines += _examples_table(task, t["worst"], ["gold", "predicted", "error"])
    return "\n".join(lines)


def analyze(predictor, *, data_dir: Path, split: str, dest: Path, top: int = 10,
            batch_size: int = 64, progress: bool = False) -> Analysis:
    """Analyse `predictor` (a loaded model directory) on the `split` files in `data_dir`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    dest = Path(dest)
    analysis = Analysis(dest, {"model": str(predictor.directory), "split": split,
                               "data_dir": str(data_dir), "metrics": {}, "tasks": {},
                               "missing": {}})
    found: list[tuple[Task, Path]] = []
    for name, task in predictor.tasks.items():
        path = Path(data_dir) / predictor.config.data.files[name][split]
        if path.is_file():
            found.append((task, path))
        else:
            analysis.numbers["missing"][name] = str(path)
            analysis.notes.append(f"{task.title} ({name}): no {split} file at {path}; "
                                  "left out.")
    if not found:
        looked = ", ".join(analysis.numbers["missing"].values())
        raise DataError(f"no labelled {split} file of the model's tasks in {data_dir} "
                        f"(looked for {looked}); point --data-dir at the task files")
    dest.mkdir(parents=True, exist_ok=True)
    for task, path in found:
        examples = read_examples(path, task)
        if not examples.ids:
            analysis.notes.append(f"{task.title} ({task.name}): {path} has no valid rows; "
                                  "left out.")
            continue
        outputs = predictor.predict_outputs(examples, batch_size, progress=progress)
        analysis.numbers["metrics"][task.metric_key] = task.score(outputs.predictions,
                                                                  examples.labels)
        base = {"title": task.title, "file": str(path), "examples": len(examples.ids),
                "skipped": examples.stats.skipped}
        if isinstance(task, RegressionTask):
            numbers = {**base, **regression_numbers(examples, outputs, top)}
            analysis.figures[f"{task.name}-scatter"] = plot_scatter(
                task, examples, outputs, numbers, dest / f"{task.name}-scatter.png")
            analysis.figures[f"{task.name}-error-by-gold"] = plot_error_by_gold(
                task, numbers, dest / f"{task.name}-error-by-gold.png")
        else:
            numbers = {**base, **classification_numbers(examples, outputs, top)}
            analysis.figures[f"{task.name}-confusion"] = plot_confusion(
                task, numbers, dest / f"{task.name}-confusion.png")
        analysis.numbers["tasks"][task.name] = numbers
    if len(analysis.numbers["metrics"]) == len(predictor.tasks):
        analysis.numbers["metrics"].update(overall_scores(analysis.numbers["metrics"]))
    analysis.numbers["figures"] = {k: p.name for k, p in analysis.figures.items()}
    analysis.numbers["notes"] = list(analysis.notes)
    (dest / NUMBERS).write_text(json.dumps(analysis.numbers, indent=2), encoding="utf-8")
    analysis.report.write_text(render_markdown(analysis), encoding="utf-8")
    return analysis
