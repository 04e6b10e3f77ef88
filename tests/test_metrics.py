import math

import pytest

from mta_local.metrics import (bootstrap_ci, classification_metrics, metrics_for, paired_bootstrap, parse_rating,
                               rating_metrics, rouge_metrics)

LABELS = ("a", "b", "c")


def test_accuracy_counts_outside_label_as_wrong():
    compute = classification_metrics(LABELS)

    result = compute(["a", " b ", "A", "zzz"], ["a", "b", "a", "c"])

    assert result["accuracy"] == 0.5


def test_macro_f1_by_hand():
    # a: tp 1, fp 0, fn 1 -> P 1, R .5, F1 2/3; b: tp 1, fp 1, fn 0 -> P .5, R 1, F1 2/3; c: tp 0 -> 0
    compute = classification_metrics(LABELS)

    result = compute(["a", "b", "b", "x"], ["a", "b", "a", "c"])

    assert result["f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_macro_f1_averages_over_whole_label_set():
    compute = classification_metrics(LABELS)

    result = compute(["a", "a"], ["a", "a"])

    assert result["f1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [("4", "5", 4.0), (" 2 ", "1", 2.0), ("4.5", "4", 4.5), ("five", "5", 1.0), ("", "1", 5.0),
     ("Score: 3", "2", 5.0), ("n/a", "3", 5.0), ("n/a", "4", 1.0)],
)
def test_parse_rating(prediction, gold, expected):
    assert parse_rating(prediction, gold) == expected


def test_rating_mae_rmse_by_hand():
    # errors: 1, 0, 4 (unparsable, gold 5 -> 1)
    result = rating_metrics(["4", "3", "great"], ["5", "3", "5"])

    assert result["mae"] == pytest.approx(5 / 3)
    assert result["rmse"] == pytest.approx(math.sqrt(17 / 3))


def test_rouge_by_hand():
    # "the cat sat" vs "the cat ran away": 2 unigrams shared, P 2/3, R 2/4 -> F 4/7; LCS also 2
    result = rouge_metrics(["The cat sat"], ["the cat ran away"])

    assert result["rouge-1"] == pytest.approx(4 / 7)
    assert result["rouge-l"] == pytest.approx(4 / 7)


def test_rouge_uses_no_stemmer():
    result = rouge_metrics(["running dogs"], ["run dog"])

    assert result["rouge-1"] == 0.0


@pytest.mark.parametrize("task, labels, names", [
    ("movie_tagging", LABELS, ("accuracy", "f1")),
    ("product_rating", ("1", "2", "3", "4", "5"), ("mae", "rmse")),
    ("news_headline", (), ("rouge-1", "rouge-l")),
])
def test_metric_pair_per_task(task, labels, names):
    assert metrics_for(task, labels).names == names


def test_bootstrap_interval_contains_value():
    compute = classification_metrics(LABELS)
    predictions, golds = ["a", "b", "c", "a", "b"] * 4, ["a", "b", "a", "a", "c"] * 4

    low, high = bootstrap_ci(compute, predictions, golds, resamples=200)["accuracy"]

    assert low <= 0.6 <= high
    assert low < high


def test_paired_bootstrap_identical_methods():
    compute = classification_metrics(LABELS)
    predictions, golds = ["a", "b", "c", "a"], ["a", "b", "a", "c"]

    result = paired_bootstrap(compute, "accuracy", predictions, predictions, golds, resamples=100)

    assert result["difference"] == 0.0
    assert result["p_two_sided"] == 1.0


def test_paired_bootstrap_lower_is_better():
    # A always exact, B off by 2: A is better on MAE, so the difference is positive
    golds = ["1", "2", "3", "4", "5"] * 4
    result = paired_bootstrap(rating_metrics, "mae", golds, ["3", "4", "5", "2", "3"] * 4, golds, resamples=200)

    assert result["difference"] == pytest.approx(2.0)
    assert result["p_not_better"] == 0.0
