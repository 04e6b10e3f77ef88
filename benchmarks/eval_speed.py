"""Time `mta-local eval` with every method on 30 users of one task (target: under 60 minutes on 2 CPU cores).

Runs the evaluation in-process and prints, per method, the mean seconds per user measured from
predictions.jsonl, then the total for 30 users. With --users below 30 the 30-user figure is an
extrapolation (mean per user x 30) and is printed as an estimate.

    python benchmarks/eval_speed.py --data data/lamp2/eval_users.json --bank-users data/lamp2/bank_users.json
    python benchmarks/eval_speed.py --data data/amazon-rating/eval_users.json --users 3 --out out/speed-rating
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mta_local.evaluate import METHODS, PREDICTIONS, EvalConfig  # noqa: E402
from mta_local.report import evaluate_and_report  # noqa: E402

TARGET_USERS = 30
TARGET_SECONDS = 3600


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="per-user evaluation file")
    parser.add_argument("--bank", help="bank name or folder (default: the built-in bank for the task)")
    parser.add_argument("--bank-users", type=Path, help="the bank's users file, for the overlap check")
    parser.add_argument("--users", type=int, default=TARGET_USERS, help="users to run (below 30: extrapolate)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/eval-speed"))
    args = parser.parse_args(argv)

    config = EvalConfig(methods=METHODS, users=args.users, seed=args.seed, exclude_overlap=True, resamples=200)
    started = time.perf_counter()
    results = evaluate_and_report(args.data, config, args.out, bank=args.bank, bank_users=args.bank_users,
                                  progress=lambda done, total: print(f"user {done}/{total} "
                                                                     f"{time.perf_counter() - started:.0f} s", flush=True))
    wall = time.perf_counter() - started

    records = [json.loads(line) for line in (args.out / PREDICTIONS).read_text().splitlines() if line.strip()]
    per_method = {m: [r["seconds"] for r in records if r["method"] == m] for m in METHODS}
    print(f"{results['task']}: {results['users']} users, wall {wall:.0f} s (includes loading; resumed work not timed)")
    per_user = 0.0
    for method, seconds in per_method.items():
        if seconds:
            mean = sum(seconds) / len(seconds)
            per_user += mean
            print(f"  {method:12s} {mean:7.1f} s / user  ({len(seconds)} users)")
    total = per_user * TARGET_USERS
    label = "measured" if results["users"] >= TARGET_USERS else f"ESTIMATE from {results['users']} users"
    print(f"30 users, all methods: {total / 60:.1f} min ({label}); target {TARGET_SECONDS / 60:.0f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
