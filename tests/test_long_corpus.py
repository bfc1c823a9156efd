"""The long-document evaluation corpus (data/long): files present and parseable, splits disjoint, documents long.

No tokenizer: the floors are in characters (SmolLM2 averages well over 3 characters a token on this text, so
30,000 characters is a safe stand-in for the builder's 9,000-token minimum). The manifest's token counts, written
by data/long/build.py, are checked for consistency with the files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

LONG = Path(__file__).resolve().parent.parent / "data" / "long"
SPLITS = ("test", "validation")
GENRES = {"technical", "fiction"}
MIN_CHARS = 30_000
MIN_TOKENS = 9_000
LONG_TOKENS = 33_000


def read_split(split: str) -> list[dict]:
    path = LONG / f"{split}.jsonl"
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if line.strip():
            record = json.loads(line)
            assert set(record) == {"text", "source", "genre", "title"}, f"{path}:{number}: keys {sorted(record)}"
            assert all(isinstance(value, str) and value.strip() for value in record.values()), f"{path}:{number}"
            records.append(record)
    return records


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {split: read_split(split) for split in SPLITS}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((LONG / "manifest.json").read_text(encoding="utf-8"))


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_files_exist():
    for name in ("test.jsonl", "validation.jsonl", "manifest.json", "README.md", "NOTICE.md", "build.py"):
        assert (LONG / name).is_file(), name
    total = sum((LONG / f"{split}.jsonl").stat().st_size for split in SPLITS)
    assert total < 3.2e6, f"the corpus grew to {total / 1e6:.2f} MB"


def test_documents_are_long_and_of_known_genres(splits):
    for split, records in splits.items():
        assert {r["genre"] for r in records} == GENRES, split
        for record in records:
            assert len(record["text"]) >= MIN_CHARS, (split, record["title"], len(record["text"]))


def test_splits_are_disjoint_by_document(splits):
    titles = {split: {r["title"] for r in records} for split, records in splits.items()}
    hashes = {split: {sha256(r["text"]) for r in records} for split, records in splits.items()}
    for split, records in splits.items():
        assert len(titles[split]) == len(records), f"repeated title in {split}"
        assert len(hashes[split]) == len(records), f"repeated text in {split}"
    assert not titles["test"] & titles["validation"]
    assert not hashes["test"] & hashes["validation"]
    # No shared paragraph either (long ones only: short lines such as "New in version 3.2." recur legitimately).
    paragraphs = {
        split: {p for r in records for p in r["text"].split("\n\n") if len(p) >= 300} for split, records in splits.items()
    }
    assert not paragraphs["test"] & paragraphs["validation"]


def test_novels_and_pages_are_not_shared(splits):
    # Fiction is split by novel, technical by page or book: the part of the title before the chapter span / colon.
    def group(record: dict) -> str:
        return record["title"].split(",")[1] if record["genre"] == "fiction" else record["title"].split(":")[0]

    test_groups = {group(r) for r in splits["test"]}
    assert not test_groups & {group(r) for r in splits["validation"]}


def test_manifest_matches_files(splits, manifest):
    for split, records in splits.items():
        entries = manifest["splits"][split]
        assert [e["title"] for e in entries] == [r["title"] for r in records]
        assert [e["sha256"] for e in entries] == [sha256(r["text"]) for r in records]
        assert all(e["tokens"] >= MIN_TOKENS for e in entries)
        assert sum(e["tokens"] >= LONG_TOKENS for e in entries) >= 2, f"{split}: too few documents for 32K scoring"
    assert sum(e["tokens"] for e in manifest["splits"]["test"]) >= 150_000
    assert sum(e["tokens"] for e in manifest["splits"]["validation"]) >= 60_000


def test_effconv_loads_a_split(splits):
    from effconv.data import load_texts  # here, not at the top: the other tests need no torch import

    texts = load_texts(str(LONG / "validation.jsonl"))
    assert texts == [r["text"] for r in splits["validation"]]
