"""Convert ACL Anthology papers into LaMP-5-format users (scholarly title generation).

Each author is a user; a history item is {id, abstract, title} of one of their papers, as in
LaMP-5. Co-authors share papers, so one paper can sit in several users' profiles.

User filter: papers from --min-year on (default 2016, the CC BY 4.0 part of the Anthology), with
a non-empty title and abstract, deduplicated per author by lowercased title; authors with at least
--min-items such papers (default 6). Author keys are the Anthology's author ids or names as
written (variants are not merged). Each user's papers are sorted by year, then paper id.
Split (fixed, seed-free): an author is an evaluation user when the first byte of sha256(author)
is below 52 (about 20 %), otherwise a bank user. An evaluation user's latest paper is the query
and the earlier ones are the profile (the latest --max-profile, default 50). Every evaluation
query's abstract is removed from bank users' profiles (co-authors included), so it never reaches
bank training data.

    python converters/acl_anthology.py ../shared/data/acl-anthology-2022/papers_with_abstracts.jsonl.gz --out data/acl
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from huffpost_news import split_users, write_split  # noqa: E402  (same split rule, same output files)


def read_papers(path: Path, min_year: int) -> dict[str, list[dict]]:
    """Return papers per author from min_year on, deduplicated per author by title, sorted by year and id."""
    users: dict[str, list[dict]] = {}
    seen: set[tuple[str, str]] = set()
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            paper = json.loads(line)
            title, abstract = (paper.get("title") or "").strip(), (paper.get("abstract") or "").strip()
            if not title or not abstract or not str(paper.get("year", "")).isdigit() or int(paper["year"]) < min_year:
                continue
            for author in paper.get("authors") or []:
                key = (str(author), title.lower())
                if key in seen:
                    continue
                seen.add(key)
                users.setdefault(str(author), []).append({"id": paper["id"], "abstract": abstract, "title": title,
                                                          "year": int(paper["year"])})
    for items in users.values():
        items.sort(key=lambda item: (item["year"], item["id"]))
    return users


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("papers", type=Path, help="papers_with_abstracts.jsonl.gz")
    parser.add_argument("--min-year", type=int, default=2016, help="keep papers from this year on")
    parser.add_argument("--min-items", type=int, default=6, help="keep authors with at least this many papers")
    parser.add_argument("--max-profile", type=int, default=50, help="keep each user's latest papers up to this many")
    parser.add_argument("--out", type=Path, required=True, help="folder for bank_users.json and eval_users.json")
    args = parser.parse_args(argv)
    if not args.papers.is_file():
        print(f"error: {args.papers} not found; pass the path of papers_with_abstracts.jsonl.gz", file=sys.stderr)
        return 1

    bank, evaluation = split_users(read_papers(args.papers, args.min_year), args.min_items, args.max_profile, "abstract")
    write_split(args.out, bank, evaluation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
