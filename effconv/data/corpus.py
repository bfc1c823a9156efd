"""Text from users: files, directories of them, JSONL records and Hugging Face datasets, as documents."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any


from ..errors import EffconvError, one_line

#: File suffixes read as plain text (one document per file, long files split at paragraphs).
TEXT_SUFFIXES = (".txt", ".md")
#: Suffixes picked up when the spec is a directory.
DIRECTORY_SUFFIXES = (".txt", ".md", ".jsonl")
#: Plain-text files longer than this are split at paragraph boundaries into documents of about
#: this many characters, so that ``max_documents`` and document boundaries stay meaningful.
MAX_DOCUMENT_CHARS = 20_000
HF_PREFIX = "hf:"


# --------------------------------------------------------------------------------------------
# Loading text
# --------------------------------------------------------------------------------------------


def load_texts(spec: str, *, text_field: str = "text", max_documents: int | None = None,
               split_long: bool = True) -> list[str]:
    """Load training documents from ``spec``.

    ``spec`` is one of:

    * a ``.txt``/``.md`` file: one document (split at paragraph boundaries into documents of
      about ``MAX_DOCUMENT_CHARS`` characters when longer than that);
    * a ``.jsonl`` file: one JSON object per line, the document is its ``text_field`` value;
    * a ``.json`` file holding a list of such objects (or of plain strings);
    * a directory: every ``.txt``/``.md``/``.jsonl`` file below it, in sorted path order;
    * ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face dataset (needs the ``datasets`` package and
      either network access or a local cache; ``SPLIT`` defaults to ``train``).

    Empty and whitespace-only documents are skipped. At most ``max_documents`` documents are
    returned. Any problem with the input raises :class:`EffconvError` with a one-line message.
    """
    if max_documents is not None and max_documents < 1:
        raise EffconvError(f"max_documents must be at least 1, got {max_documents}")
    if spec.startswith(HF_PREFIX):
        return _load_hf_dataset(spec, text_field=text_field, max_documents=max_documents)

    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(path, text_field=text_field, max_documents=max_documents, split_long=split_long)
    if not path.exists():
        raise EffconvError(f"data file not found: {spec}")
    documents = _take(_iter_file_documents(path, text_field=text_field, split_long=split_long), max_documents)
    if not documents:
        raise EffconvError(f"data file contains no text: {path}")
    return documents


def _take(documents: Iterator[str], limit: int | None) -> list[str]:
    """The first ``limit`` documents (all when ``limit`` is None), consuming no more than needed."""
    taken: list[str] = []
    if limit is not None and limit <= 0:
        return taken
    for document in documents:
        taken.append(document)
        if limit is not None and len(taken) >= limit:
            break  # stop before reading (and possibly failing on) anything beyond the limit
    return taken


def _load_directory(directory: Path, *, text_field: str, max_documents: int | None, split_long: bool) -> list[str]:
    files = sorted(
        path
        for path in directory.rglob("*")
        if path.is_file()
        and path.suffix.lower() in DIRECTORY_SUFFIXES
        # Skip hidden files and folders (.git, editor backups) below the given directory.
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )
    if not files:
        suffixes = "/".join(DIRECTORY_SUFFIXES)
        raise EffconvError(f"no {suffixes} files in data directory: {directory}")

    def all_documents() -> Iterator[str]:
        for path in files:
            yield from _iter_file_documents(path, text_field=text_field, split_long=split_long)

    documents = _take(all_documents(), max_documents)
    if not documents:
        raise EffconvError(f"no text in any of the {len(files)} data files in {directory}")
    return documents


def _iter_file_documents(path: Path, *, text_field: str, split_long: bool = True) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        text = _read_text(path)
        yield from _split_long_text(text) if split_long else ([text] if text.strip() else [])
    elif suffix == ".jsonl":
        yield from _iter_jsonl_documents(path, text_field=text_field)
    elif suffix == ".json":
        yield from _iter_json_documents(path, text_field=text_field)
    else:
        raise EffconvError(
            f"unsupported data file type {suffix or '(no suffix)'!r}: {path} "
            "(expected .txt, .md, .jsonl, .json, a directory or hf:NAME)"
        )


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig drops a byte-order mark, which would otherwise break the first JSONL line.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise EffconvError(f"data file is not UTF-8 text: {path} (byte {error.start})") from error
    except OSError as error:
        raise EffconvError(f"cannot read data file {path}: {error.strerror or error}") from error


def _split_long_text(text: str, max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """Split ``text`` into documents of at most about ``max_chars`` characters at blank lines.

    A single paragraph longer than ``max_chars`` is cut at the last whitespace before the limit
    (or hard at the limit when there is none).
    """
    text = text.strip()
    if not text:
        return []
    if len(text) <= max_chars:
        return [text]

    documents: list[str] = []
    current: list[str] = []
    current_chars = 0
    for paragraph in re.split(r"\n[ \t]*\n", text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        for piece in _cut_paragraph(paragraph, max_chars):
            added_chars = len(piece) + (2 if current else 0)  # 2 for the "\n\n" joiner
            if current and current_chars + added_chars > max_chars:
                documents.append("\n\n".join(current))
                current, current_chars = [], 0
                added_chars = len(piece)
            current.append(piece)
            current_chars += added_chars
    if current:
        documents.append("\n\n".join(current))
    return documents


def _cut_paragraph(paragraph: str, max_chars: int) -> Iterator[str]:
    while len(paragraph) > max_chars:
        cut = paragraph.rfind(" ", max_chars // 2, max_chars)
        if cut <= 0:
            cut = max_chars
        yield paragraph[:cut].rstrip()
        paragraph = paragraph[cut:].lstrip()
    if paragraph:
        yield paragraph


def _iter_jsonl_documents(path: Path, *, text_field: str) -> Iterator[str]:
    text = _read_text(path)
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise EffconvError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
        document = _text_from_record(record, text_field=text_field, where=f"{path}:{line_number}")
        if document.strip():
            yield document


def _iter_json_documents(path: Path, *, text_field: str) -> Iterator[str]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise EffconvError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
    if not isinstance(records, list):
        raise EffconvError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
    for index, record in enumerate(records):
        document = record if isinstance(record, str) else _text_from_record(
            record, text_field=text_field, where=f"{path}: item {index}"
        )
        if document.strip():
            yield document


def _text_from_record(record: Any, *, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise EffconvError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        fields = ", ".join(map(str, list(record)[:10])) or "none"
        raise EffconvError(f"{where}: no field {text_field!r} (fields present: {fields})")
    value = record[text_field]
    if not isinstance(value, str):
        raise EffconvError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string")
    return value


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> (name, config, split)."""
    body = spec[len(HF_PREFIX):]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise EffconvError(f"bad dataset spec {spec!r}: expected hf:NAME[:CONFIG][@SPLIT]")
    return name, (config or None), (split or "train")


def _load_hf_dataset(spec: str, *, text_field: str, max_documents: int | None) -> list[str]:
    name, config, split = _parse_hf_spec(spec)
    try:
        import datasets  # imported lazily: optional, heavy, and only needed for hf: specs
    except ImportError as error:
        raise EffconvError(
            f"loading {spec!r} needs the 'datasets' package, which is not installed (pip install datasets)"
        ) from error

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many unrelated types; all mean "unavailable"
        raise EffconvError(
            f"could not load Hugging Face dataset {spec!r}: {one_line(error)} "
            "(without network access only datasets already in the local cache work; set HF_HUB_OFFLINE=1)"
        ) from error

    def documents() -> Iterator[str]:
        for index, row in enumerate(dataset):
            document = _text_from_record(row, text_field=text_field, where=f"{spec} row {index}")
            if document.strip():
                yield document

    taken = _take(documents(), max_documents)
    if not taken:
        raise EffconvError(f"dataset {spec!r} contains no text in field {text_field!r}")
    return taken
