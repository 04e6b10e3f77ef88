"""Summarize an evaluation: metrics with bootstrap intervals, the paired test, a Markdown table and a chart."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import EvalError
from .evaluate import BASELINES, METHODS
from .metrics import HIGHER_IS_BETTER, bootstrap_ci, metrics_for, paired_bootstrap
from .tasks import Task

logger = logging.getLogger(__name__)

METRIC_TITLES = {"accuracy": "Acc", "f1": "F1", "mae": "MAE", "rmse": "RMSE", "rouge-1": "R-1", "rouge-l": "R-L"}


def summarize(records: dict[tuple[str, str], dict], task: Task, methods: tuple[str, ...], user_ids: list[str],
              resamples: int = 1000, seed: int = 0) -> dict:
    """Return metrics per method over the users that have every method's answers.

    Result: {"metrics": [primary, secondary], "users", "queries", "methods": {method: {metric: value,
    "ci": {metric: [low, high]}, "seconds_per_user"}}, "paired_test": {...} or None}.
    """
    pair = metrics_for(task.name, task.labels)
    complete = [u for u in user_ids if all((u, m) in records for m in methods)]
    golds = [q["gold"] for u in complete for q in records[(u, methods[0])]["queries"]]
    predictions = {m: [q["prediction"] for u in complete for q in records[(u, m)]["queries"]] for m in methods}
    summary = {"metrics": list(pair.names), "users": len(complete), "queries": len(golds), "methods": {},
               "paired_test": None}
    if not golds:
        return summary

    for method in methods:
        values = pair.compute(predictions[method], golds)
        intervals = bootstrap_ci(pair.compute, predictions[method], golds, resamples, seed)
        seconds = [records[(u, method)]["seconds"] for u in complete]
        summary["methods"][method] = {**{name: round(values[name], 4) for name in pair.names},
                                      "ci": {name: [round(v, 4) for v in intervals[name]] for name in pair.names},
                                      "seconds_per_user": round(sum(seconds) / len(seconds), 2)}

    # MTA against the best baseline on the primary metric
    primary = pair.names[0]
    baselines = [m for m in methods if m in BASELINES]
    if "mta" in methods and baselines:
        sign = 1 if HIGHER_IS_BETTER[primary] else -1
        best = max(baselines, key=lambda m: (sign * summary["methods"][m][primary], -METHODS.index(m)))
        test = paired_bootstrap(pair.compute, primary, predictions["mta"], predictions[best], golds, resamples, seed)
        summary["paired_test"] = {"method": "mta", "baseline": best, "metric": primary, "test": "paired bootstrap",
                                  "resamples": resamples, **{k: round(v, 4) for k, v in test.items()}}
    return summary


def markdown_table(summary: dict, task: Task, label: str) -> str:
    """Return a Table-1-style Markdown table: one row per metric pair, methods as columns, then intervals."""
    methods = list(summary["methods"])
    if not methods:
        return f"{label}: no user has answers from every method yet.\n"
    first, second = summary["metrics"]
    header = f"| task | metric | {' | '.join(methods)} |"
    rule = "|" + "---|" * (len(methods) + 2)
    pair_row = (f"| {label} | {METRIC_TITLES[first]} / {METRIC_TITLES[second]} | "
                + " | ".join(f"{_fmt(summary['methods'][m][first])} / {_fmt(summary['methods'][m][second])}"
                             for m in methods) + " |")
    ci_rows = [f"| | 95% CI {METRIC_TITLES[name]} | "
               + " | ".join(f"{_fmt(summary['methods'][m]['ci'][name][0])}-{_fmt(summary['methods'][m]['ci'][name][1])}"
                            for m in methods) + " |" for name in (first, second)]
    seconds_row = "| | s / user | " + " | ".join(f"{summary['methods'][m]['seconds_per_user']:.1f}" for m in methods) + " |"
    lines = [header, rule, pair_row, *ci_rows, seconds_row, "",
             f"{summary['users']} users, {summary['queries']} queries ({task.name})."]
    test = summary.get("paired_test")
    if test:
        lines.append(f"MTA vs best baseline ({test['baseline']}) on {METRIC_TITLES[test['metric']]}: difference "
                     f"{test['difference']:+.4f} (positive: MTA better), paired bootstrap ({test['resamples']} "
                     f"resamples) two-sided p = {test['p_two_sided']:.3f}.")
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return f"{value:.4f}".replace("0.", ".", 1) if 0 <= value < 1 else f"{value:.4f}"


def write_chart(summary: dict, path: Path, title: str) -> bool:
    """Draw methods x metrics as grouped bars with 95% interval whiskers; return False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so no chart was drawn; pip install 'mta-local[eval]'")
        return False
    methods = list(summary["methods"])
    if not methods:
        return False

    figure, axes = plt.subplots(1, 2, figsize=(max(6, 1.2 * len(methods) + 2) * 2 / 1.5, 3.6))
    for axis, metric in zip(axes, summary["metrics"]):
        values = [summary["methods"][m][metric] for m in methods]
        low = [v - summary["methods"][m]["ci"][metric][0] for v, m in zip(values, methods)]
        high = [summary["methods"][m]["ci"][metric][1] - v for v, m in zip(values, methods)]
        colors = [_bar_color(m) for m in methods]
        axis.bar(range(len(methods)), values, yerr=[low, high], color=colors, capsize=3)
        axis.set_xticks(range(len(methods)), methods, rotation=40, ha="right")
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        axis.set_title(f"{METRIC_TITLES[metric]} ({better} is better)")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _bar_color(method: str) -> str:
    if method == "mta":
        return "tab:red"
    if method in BASELINES:
        return "tab:gray"
    return "tab:blue"


# ---------------------------------------------------------------------------------------------
# the whole evaluation, as `mta-local eval` runs it


def evaluate_and_report(data, config, out_dir: Path, task: str | None = None, outputs=None, bank: str | None = None,
                        bank_users=None, model: str | None = None, progress=None, report_only: bool = False) -> dict:
    """Load users, check them against the bank, run the methods and write results.json/.md/.png.

    With ``report_only`` nothing runs: the answers already in ``out_dir`` are summarized (users
    missing a method are left out). Returns the results dict (also written to ``out_dir / "results.json"``).
    """
    import json
    import time

    from dataclasses import replace

    from .bank import has_builtin_bank, open_bank
    from .data import check_disjoint, load_eval_users
    from .evaluate import BANK_METHODS, METHODS, check_run_file, choose_users, read_done, run_eval

    started = time.perf_counter()
    users = load_eval_users(data, task, outputs)
    the_task = users[0].history.task

    # bank: needed by merged-only and mta; its users and training texts must not overlap the evaluation
    the_bank = None
    if bank is None and config.methods == METHODS and not has_builtin_bank(the_task.name):
        # "all" on a task without a bank: run what needs no bank rather than nothing
        logger.warning("no built-in bank for task %s, so merged-only and mta are left out; pass --bank to run them",
                       the_task.name)
        config = replace(config, methods=tuple(m for m in METHODS if m not in BANK_METHODS))
    if bank is not None or set(config.methods) & set(BANK_METHODS):
        the_bank = open_bank(bank, the_task.name)
        if the_bank.task != the_task.name:
            raise EvalError(f"bank {the_bank.bank_id} is for task {the_bank.task!r} but the data is "
                            f"{the_task.name!r}; pass --bank with a {the_task.name} bank.")
    if the_bank is not None or bank_users is not None:
        users = check_disjoint(users, the_bank.manifest if the_bank else None, bank_users, config.exclude_overlap)
    if the_bank is not None and bank_users is None:
        logger.warning("only user ids were checked against bank %s; pass --bank-users to check query texts too",
                       the_bank.bank_id)
    chosen = choose_users(users, config.users, config.seed)

    run = {"task": the_task.name, "data": str(Path(data).resolve()), "bank": the_bank.bank_id if the_bank else None,
           "model": model, "config": config.to_dict()}
    if report_only:
        check_run_file(Path(out_dir), run)
        records = read_done(Path(out_dir))
    else:
        records = run_eval(chosen, the_task, config, Path(out_dir), run, the_bank, model, progress)
    summary = summarize(records, the_task, config.methods, [u.user_id for u in chosen], config.resamples, config.seed)
    results = {**run, "users_available": len(users), "users_evaluated": [u.user_id for u in chosen],
               "wall_seconds": round(time.perf_counter() - started, 1), **summary}

    out_dir = Path(out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    label = the_task.lamp_id or the_task.name
    (out_dir / "results.md").write_text(markdown_table(summary, the_task, label), encoding="utf-8")
    write_chart(summary, out_dir / "results.png", f"{label}: {summary['users']} users, seed {config.seed}")
    return results
