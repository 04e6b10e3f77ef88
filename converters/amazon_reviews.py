"""Convert the Amazon Musical Instruments reviews (2014, 5-core, Kaggle CSV) into LaMP-format users.

Tasks: product_rating (LaMP-3 style, {text, score}) and review_title (review -> the reviewer's
own summary line, written as the news_headline-shaped item {text, title}, so it runs as a
free-text title task).

Cleaning: rows with empty review text are dropped; reviews are deduplicated per reviewer by
lowercased text (the first kept); each user's items are sorted by review time.
Split (fixed, seed-free): a reviewer is an evaluation user when the first byte of
sha256(reviewerID) is below 52 (about 20 %), otherwise a bank user. An evaluation user's latest
review is the query and the earlier ones are the profile. Evaluation query texts are removed from
bank users' profiles, so they never reach bank training data.

    python converters/amazon_reviews.py ../shared/data/amazon-musical-instruments-2014/Musical_instruments_reviews.csv.zip \
        --task product_rating --out data/amazon-rating
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

EVAL_BYTE_LIMIT = 52  # sha256(reviewerID)[0] < 52 -> evaluation user (52/256 = 20.3 %)


def read_reviews(path: Path) -> dict[str, list[dict]]:
    """Return reviews per reviewer, deduplicated and sorted by time."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".csv"))
        rows = list(csv.DictReader(io.TextIOWrapper(archive.open(name), encoding="utf-8")))
    users: dict[str, list[dict]] = {}
    seen: set[tuple[str, str]] = set()
    for row in rows:
        text = (row["reviewText"] or "").strip()
        key = (row["reviewerID"], text.lower())
        if not text or key in seen:
            continue
        seen.add(key)
        users.setdefault(row["reviewerID"], []).append({
            "id": f"{row['reviewerID']}-{row['asin']}",
            "text": text,
            "score": int(float(row["overall"])),
            "title": (row["summary"] or "").strip(),
            "time": int(row["unixReviewTime"]),
        })
    for items in users.values():
        items.sort(key=lambda item: (item["time"], item["id"]))
    return users


def is_eval_user(user_id: str) -> bool:
    return hashlib.sha256(user_id.encode()).digest()[0] < EVAL_BYTE_LIMIT


def to_item(item: dict, task: str) -> dict:
    if task == "product_rating":
        return {"id": item["id"], "text": item["text"], "score": item["score"]}
    return {"id": item["id"], "text": item["text"], "title": item["title"]}


def convert(path: Path, task: str, min_items: int) -> tuple[list[dict], list[dict]]:
    users = read_reviews(path)
    if task == "review_title":
        users = {uid: [i for i in items if i["title"]] for uid, items in users.items()}
    bank, evaluation = [], []
    for user_id in sorted(users):
        items = users[user_id]
        if len(items) < min_items:
            continue
        if is_eval_user(user_id):
            query = items[-1]
            gold = str(query["score"]) if task == "product_rating" else query["title"]
            evaluation.append({"user_id": user_id, "profile": [to_item(i, task) for i in items[:-1]],
                               "query": [{"id": query["id"], "input": query["text"], "gold": gold}]})
        else:
            bank.append({"user_id": user_id, "profile": [to_item(i, task) for i in items]})

    # keep every evaluation query's text out of bank training data
    held_out = {user["query"][0]["input"].lower() for user in evaluation}
    for user in bank:
        user["profile"] = [item for item in user["profile"] if item["text"].lower() not in held_out]
    bank = [user for user in bank if len(user["profile"]) >= min_items]
    return bank, evaluation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv_zip", type=Path, help="Musical_instruments_reviews.csv.zip")
    parser.add_argument("--task", choices=("product_rating", "review_title"), default="product_rating")
    parser.add_argument("--min-items", type=int, default=6, help="keep users with at least this many reviews")
    parser.add_argument("--out", type=Path, required=True, help="folder for bank_users.json and eval_users.json")
    args = parser.parse_args(argv)
    if not args.csv_zip.is_file():
        print(f"error: {args.csv_zip} not found; pass the path of Musical_instruments_reviews.csv.zip", file=sys.stderr)
        return 1

    bank, evaluation = convert(args.csv_zip, args.task, args.min_items)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bank_users.json").write_text(json.dumps(bank, indent=1) + "\n", encoding="utf-8")
    (args.out / "eval_users.json").write_text(json.dumps(evaluation, indent=1) + "\n", encoding="utf-8")
    print(f"{len(bank)} bank users, {len(evaluation)} evaluation users -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
