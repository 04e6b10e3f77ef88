"""Task metrics as the LaMP benchmark's evaluation scripts compute them, with bootstrap intervals.

- Classification (LaMP-1, LaMP-2): predictions and golds are stripped and mapped to their index in
  the label set; anything outside the set maps to -1 and is wrong. Accuracy, and sklearn's
  ``f1_score(labels=range(len(label set)), average="macro")``.
- Rating (LaMP-3): ``float(prediction.strip())``; an output that does not parse counts as the
  rating farthest from the gold (1 or 5). MAE and RMSE.
- Free text (LaMP-4, LaMP-5): rouge-score ROUGE-1 and ROUGE-L F-measure without stemming,
  averaged over queries (LaMP's script reports the ``evaluate`` aggregator's bootstrap estimate
  of this mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

# metric name -> True when higher is better
HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "mae": False, "rmse": False, "rouge-1": True, "rouge-l": True}


@dataclass(frozen=True)
class MetricPair:
    """The two metrics reported for a task, the first one primary (used for the paired test)."""

    names: tuple[str, str]
    compute: Callable[[list[str], list[str]], dict[str, float]]


def classification_metrics(labels: tuple[str, ...]) -> Callable[[list[str], list[str]], dict[str, float]]:
    """Return a function (predictions, golds) -> {accuracy, f1} over the closed label set."""
    from sklearn.metrics import f1_score

    index = {label: i for i, label in enumerate(labels)}

    def compute(predictions: list[str], golds: list[str]) -> dict[str, float]:
        predicted = [index.get(p.strip(), -1) for p in predictions]
        gold = [index.get(g.strip(), -1) for g in golds]
        accuracy = float(np.mean([p == g for p, g in zip(predicted, gold)]))
        f1 = f1_score(gold, predicted, labels=list(range(len(labels))), average="macro", zero_division=0)
        return {"accuracy": accuracy, "f1": float(f1)}

    return compute


def parse_rating(prediction: str, gold: str) -> float:
    """Return the predicted rating, or the rating farthest from the gold (1 or 5) when it does not parse."""
    try:
        return float(prediction.strip())
    except ValueError:
        gold_value = float(gold)
        return 1.0 if abs(1 - gold_value) > abs(5 - gold_value) else 5.0


def rating_metrics(predictions: list[str], golds: list[str]) -> dict[str, float]:
    errors = np.array([parse_rating(p, g) - float(g) for p, g in zip(predictions, golds)])
    return {"mae": float(np.mean(np.abs(errors))), "rmse": float(math.sqrt(np.mean(errors ** 2)))}


def rouge_metrics(predictions: list[str], golds: list[str]) -> dict[str, float]:
    scores = rouge_per_query(predictions, golds)
    return {"rouge-1": float(np.mean(scores["rouge-1"])), "rouge-l": float(np.mean(scores["rouge-l"]))}


def rouge_per_query(predictions: list[str], golds: list[str]) -> dict[str, list[float]]:
    """Return per-query ROUGE-1 and ROUGE-L F-measures (rouge-score, no stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    rows = [scorer.score(g.strip(), p.strip()) for p, g in zip(predictions, golds)]
    return {"rouge-1": [r["rouge1"].fmeasure for r in rows], "rouge-l": [r["rougeL"].fmeasure for r in rows]}


def metrics_for(task_name: str, labels: tuple[str, ...]) -> MetricPair:
    """Return the LaMP metric pair for a task: accuracy/F1, MAE/RMSE or ROUGE-1/ROUGE-L."""
    if task_name == "product_rating":
        return MetricPair(("mae", "rmse"), rating_metrics)
    if labels:
        return MetricPair(("accuracy", "f1"), classification_metrics(labels))
    return MetricPair(("rouge-1", "rouge-l"), rouge_metrics)


# ---------------------------------------------------------------------------------------------
# uncertainty

def bootstrap_ci(compute, predictions: list[str], golds: list[str], resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Return a percentile bootstrap interval per metric, resampling queries with replacement."""
    rng = np.random.default_rng(seed)
    n = len(golds)
    samples: dict[str, list[float]] = {}
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        for name, value in compute([predictions[i] for i in pick], [golds[i] for i in pick]).items():
            samples.setdefault(name, []).append(value)
    tail = (1.0 - level) / 2 * 100
    return {name: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for name, v in samples.items()}


def paired_bootstrap(compute, metric: str, predictions_a: list[str], predictions_b: list[str], golds: list[str],
                     resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap of method A against method B on one metric, over the same queries.

    Returns the observed difference (A - B, signed so that positive means A is better), the share
    of resamples where A is not better, and the two-sided p-value (twice the smaller tail).
    """
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    observed = sign * (compute(predictions_a, golds)[metric] - compute(predictions_b, golds)[metric])
    rng = np.random.default_rng(seed)
    n = len(golds)
    not_better = 0
    differences = []
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        sample_golds = [golds[i] for i in pick]
        difference = sign * (compute([predictions_a[i] for i in pick], sample_golds)[metric]
                             - compute([predictions_b[i] for i in pick], sample_golds)[metric])
        differences.append(difference)
        not_better += difference <= 0
    share = not_better / resamples
    better = sum(d >= 0 for d in differences) / resamples
    return {"difference": observed, "p_not_better": share, "p_two_sided": min(1.0, 2 * min(share, better))}
