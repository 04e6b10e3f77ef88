"""Write the example history files under docs/examples from evaluation-side users.

Each example is one real user's history (10 items) from the evaluation side of a split, so no
built-in bank has seen it; queries.json contains each user's held-out query and gold answer.

    python converters/examples.py --lamp2 data/lamp2/eval_users.json --amazon data/amazon-rating/eval_users.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LAMP2_USERS = ("8000029", "8000137")  # entries of two different real LaMP-2 users
AMAZON_USERS = ("A165EMA3YTIM6A", "AZBUUKQLYKUCL")  # Amazon reviewers with 10 earlier reviews


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lamp2", type=Path, required=True, help="eval_users.json from converters/lamp2_movies.py")
    parser.add_argument("--amazon", type=Path, required=True, help="eval_users.json from converters/amazon_reviews.py")
    parser.add_argument("--out", type=Path, default=Path("docs/examples"))
    args = parser.parse_args(argv)

    queries = {}
    for source, wanted, prefix in ((args.lamp2, LAMP2_USERS, "lamp2-user"), (args.amazon, AMAZON_USERS, "amazon-user")):
        users = {str(user["user_id"]): user for user in json.loads(source.read_text(encoding="utf-8"))}
        for user_id in wanted:
            user = users[user_id]
            name = f"{prefix}-{user_id}.json"
            (args.out / name).write_text(json.dumps(user["profile"], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            queries[name] = {"prompt": _prompt(user["query"][0]["input"], prefix), "gold": user["query"][0]["gold"]}
    (args.out / "queries.json").write_text(json.dumps(queries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(queries)} examples to {args.out}")
    return 0


def _prompt(query_input: str, prefix: str) -> str:
    """Return the query as a chat prompt in the task's format (LaMP-2 inputs already are)."""
    if prefix == "lamp2-user":
        return query_input
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mta_local.tasks import TASKS

    return TASKS["product_rating"].instruction(query_input)


if __name__ == "__main__":
    sys.exit(main())
