"""Convert the HuffPost News Category Dataset into LaMP-4-format users (news headline generation).

Each author is a user; a history item is {id, text: short description, title: headline}, as in
LaMP-4 (which was built from this dataset).

Cleaning: the given JSON-lines files are read in order and deduplicated by lowercased headline
(the first copy kept). Only records with exactly one named author are kept: author strings with
a comma (wire bylines such as "X, AP", "Stateline, Editorial Partner"), " and " or "&" (several
authors) and empty ones are dropped, so every item is attributed to one person. Rows with an empty
short description are dropped. Each user's items are sorted by date (then headline).
User filter: authors with at least --min-items items (default 6).
Split (fixed, seed-free): an author is an evaluation user when the first byte of sha256(author)
is below 52 (about 20 %), otherwise a bank user. An evaluation user's latest item is the query
and the earlier ones are the profile (the latest --max-profile, default 50). Evaluation query
texts are removed from bank users' profiles, so they never reach bank training data.

    python converters/huffpost_news.py ../shared/data/huffpost-news-category/News_Category_Dataset_v3.first10000.json \
        ../shared/data/huffpost-news-category/News_Category_Dataset_v2.first4782.json --out data/huffpost
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

EVAL_BYTE_LIMIT = 52  # sha256(author)[0] < 52 -> evaluation user (52/256 = 20.3 %)


def single_author(authors: str) -> str | None:
    """Return the author's name, or None when the string names no one or several people or a wire service."""
    name = " ".join(authors.split())
    if not name or "," in name or " and " in name or "&" in name:
        return None
    return name


def read_items(paths: list[Path]) -> dict[str, list[dict]]:
    """Return items per single author, deduplicated by headline and sorted by date."""
    users: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            record = json.loads(line)
            headline, text = record["headline"].strip(), record["short_description"].strip()
            author = single_author(record.get("authors", ""))
            if not headline or headline.lower() in seen or not text or author is None:
                continue
            seen.add(headline.lower())
            users.setdefault(author, []).append({"id": f"{path.stem}-{number}", "text": text, "title": headline,
                                                 "date": record["date"]})
    for items in users.values():
        items.sort(key=lambda item: (item["date"], item["title"]))
    return users


def is_eval_user(user_id: str) -> bool:
    return hashlib.sha256(user_id.encode()).digest()[0] < EVAL_BYTE_LIMIT


def split_users(users: dict[str, list[dict]], min_items: int, max_profile: int, input_field: str):
    """Split users into bank users and evaluation users (latest item as query); see the module docstring."""
    bank, evaluation = [], []
    for user_id in sorted(users):
        items = [{k: v for k, v in item.items() if k not in ("date", "year")} for item in users[user_id]]
        if len(items) < min_items:
            continue
        if is_eval_user(user_id):
            query = items[-1]
            evaluation.append({"user_id": user_id, "profile": items[:-1][-max_profile:],
                               "query": [{"id": query["id"], "input": query[input_field], "gold": query["title"]}]})
        else:
            bank.append({"user_id": user_id, "profile": items[-max_profile:]})

    # keep every evaluation query's text out of bank training data
    held_out = {user["query"][0]["input"].lower() for user in evaluation}
    for user in bank:
        user["profile"] = [item for item in user["profile"] if item[input_field].lower() not in held_out]
    bank = [user for user in bank if len(user["profile"]) >= min_items]
    return bank, evaluation


def write_split(out: Path, bank: list[dict], evaluation: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bank_users.json").write_text(json.dumps(bank, indent=1) + "\n", encoding="utf-8")
    (out / "eval_users.json").write_text(json.dumps(evaluation, indent=1) + "\n", encoding="utf-8")
    print(f"{len(bank)} bank users, {len(evaluation)} evaluation users -> {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", type=Path, nargs="+", help="News_Category_Dataset_*.json (JSON lines)")
    parser.add_argument("--min-items", type=int, default=6, help="keep authors with at least this many items")
    parser.add_argument("--max-profile", type=int, default=50, help="keep each user's latest items up to this many")
    parser.add_argument("--out", type=Path, required=True, help="folder for bank_users.json and eval_users.json")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        print(f"error: {', '.join(missing)} not found; pass the News_Category_Dataset JSON-lines files", file=sys.stderr)
        return 1

    bank, evaluation = split_users(read_items(args.files), args.min_items, args.max_profile, "text")
    write_split(args.out, bank, evaluation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
