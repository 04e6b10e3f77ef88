"""Split the LaMP-2 movie-tagging test users (72 entries) into bank and evaluation users by real user.

The 72 entries are 24 real users with 3 entries each: LaMP builds one entry per question, and each
entry's query movie sits, with its gold tag, in the sibling entries' profiles. Entries are grouped
into real users by the Jaccard overlap of their (description, tag) pairs (>= 0.5), which gives 24
groups of 3. Groups are ordered by their smallest entry user_id; groups 0, 2, 4, ... are bank
users (profile = union of the group's profiles and queries, deduplicated), groups 1, 3, 5, ... are
evaluation users (their 3 entries kept as they are). No evaluation group's movie text enters the
bank unless another real user tagged the same film on their own.

    python converters/lamp2_movies.py ../shared/data/lamp2-movie-tagging/test_100.json --out data/lamp2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

JACCARD_MIN = 0.5


def _pairs(entry: dict) -> set[tuple[str, str]]:
    return {(item["description"], item["tag"]) for item in entry["profile"]}


def group_entries(entries: list[dict]) -> list[list[dict]]:
    """Group entries of the same real user (union-find over Jaccard >= 0.5 pairs)."""
    parent = list(range(len(entries)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = [_pairs(entry) for entry in entries]
    for i in range(len(entries)):
        for j in range(i + 1, len(entries)):
            if len(pairs[i] & pairs[j]) / len(pairs[i] | pairs[j]) >= JACCARD_MIN:
                parent[find(i)] = find(j)
    groups: dict[int, list[dict]] = {}
    for i, entry in enumerate(entries):
        groups.setdefault(find(i), []).append(entry)
    ordered = [sorted(group, key=lambda e: int(e["user_id"])) for group in groups.values()]
    return sorted(ordered, key=lambda group: int(group[0]["user_id"]))


def merged_user(group: list[dict]) -> dict:
    """Return one bank user from a group: all profile items and query answers, deduplicated."""
    items, seen = [], set()
    for entry in group:
        candidates = list(entry["profile"]) + [
            {"id": q["id"], "description": q["input"].split("description: ", 1)[-1].removesuffix(" Tag:").strip()
             if "description: " in q["input"] else q["input"], "tag": q["gold"]}
            for q in entry["query"]
        ]
        for item in candidates:
            key = (item["description"], item["tag"])
            if key not in seen:
                seen.add(key)
                items.append({"id": str(item["id"]), "description": item["description"], "tag": item["tag"]})
    return {"user_id": str(group[0]["user_id"]), "entries": [str(e["user_id"]) for e in group], "profile": items}


def split(entries: list[dict]) -> tuple[list[dict], list[dict], list[list[dict]]]:
    groups = group_entries(entries)
    bank = [merged_user(group) for index, group in enumerate(groups) if index % 2 == 0]
    evaluation = [entry for index, group in enumerate(groups) if index % 2 == 1 for entry in group]
    return bank, evaluation, groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("test_json", type=Path, help="LaMP-2 test_100.json (72 entries)")
    parser.add_argument("--out", type=Path, required=True, help="folder for bank_users.json and eval_users.json")
    args = parser.parse_args(argv)
    if not args.test_json.is_file():
        print(f"error: {args.test_json} not found; pass the path of the LaMP-2 test_100.json file", file=sys.stderr)
        return 1

    entries = json.loads(args.test_json.read_text(encoding="utf-8"))
    bank, evaluation, groups = split(entries)
    sizes = sorted({len(group) for group in groups})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bank_users.json").write_text(json.dumps(bank, indent=1) + "\n", encoding="utf-8")
    (args.out / "eval_users.json").write_text(json.dumps(evaluation, indent=1) + "\n", encoding="utf-8")
    print(f"{len(groups)} real users (group sizes {sizes}): {len(bank)} bank users, "
          f"{len(evaluation)} evaluation entries -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
