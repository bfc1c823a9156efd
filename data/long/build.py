"""Build the long-document evaluation corpus (data/long/*.jsonl) from installed Debian packages.

Sources (install them first: ``apt-get install --no-install-recommends python3.11-doc r-cran-janeaustenr``):

* ``python3.11-doc``: the reStructuredText sources of the CPython 3.11 documentation, as shipped by the Sphinx build
  under ``/usr/share/doc/python3.11/html/_sources`` (PSF licence). Genre ``technical``: one document = one whole page,
  or one whole book for the books in ``PY_BOOKS`` (the Tutorial, the Language Reference: their pages in reading
  order), converted to plain text: markup removed, tables, indices and grammar listings dropped, code blocks longer
  than ``MAX_CODE_LINES`` lines dropped, pages that are more than ``MAX_CODE_FRACTION`` code left out.
* ``r-cran-janeaustenr``: the text of Jane Austen's six completed novels (Project Gutenberg transcriptions; the
  novels are in the public domain), stored in the package's R lazy-load database, read here by a small R
  deserialiser (no R needed). Genre ``fiction``: one document = a run of consecutive whole chapters from a novel's
  opening (a whole novel is too long to ship). All documents of a novel are in the same split.

Every document has at least ``MIN_TOKENS`` tokens under the SmolLM2 tokenizer (so it can be scored at 8K context);
``long`` ones at least ``LONG_MIN_TOKENS`` (32K context). Documents go to the ``test`` and ``validation`` splits by
seeded shuffles (``SEED``), per genre, by document (technical) or by novel (fiction). Output, next to this script:
``test.jsonl``, ``validation.jsonl`` (one JSON object per line: text, source, genre, title), ``manifest.json`` (seed,
package versions, per-document token counts and text hashes), ``NOTICE.md`` (licences, copied from the packages),
and the statistics block of ``README.md``.

Run from the repository root::

    PYTHONPATH=. python data/long/build.py            # SmolLM2 tokenizer through effconv.loading
    python data/long/build.py --tokenizer DIR          # or any Hugging Face tokenizer directory

Needs only the standard library and ``transformers`` (for the tokenizer).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import statistics
import struct
import subprocess
import sys
import zlib
from pathlib import Path

SEED = 20241202
MIN_TOKENS = 9_000
LONG_MIN_TOKENS = 33_000
#: Literal/code blocks longer than this many lines are dropped (short examples are kept, as in the rendered page).
MAX_CODE_LINES = 30
#: Pages whose plain text is more than this fraction code (by characters) are not used: listings, not prose.
MAX_CODE_FRACTION = 0.40

#: How many documents of each kind go to each split, per genre.
TECH_COUNTS = {"test": {"long": 2, "standard": 10}, "validation": {"long": 1, "standard": 4}}
#: Fiction: novels per split; documents per novel (from its opening: long novels give [long, std, std]).
FICTION_NOVELS = {"test": 4, "validation": 2}
FICTION_LONG_NOVELS = {"test": 2, "validation": 1}
FICTION_DOCS_PER_NOVEL = 3
#: A fiction run of chapters stops at the first chapter end past this many tokens.
FICTION_STD_TARGET = 9_300
FICTION_LONG_TARGET = 33_300

PY_PACKAGE = "python3.11-doc"
PY_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
PY_VERSION = "3.11"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DB = Path("/usr/lib/R/site-library/janeaustenr/data/Rdata")
AUSTEN_TITLES = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}
#: Pages never used: auto-generated (changelog), legal text (license, copyright), indices.
PY_EXCLUDE = {"whatsnew/changelog", "license", "copyright", "contents", "glossary", "py-modindex", "genindex"}

#: Documentation books used whole (each is one document; their pages are never documents of their own).
PY_BOOKS = {"tutorial": "The Python Tutorial", "reference": "The Python Language Reference"}
#: Book pages left out: the full grammar is a listing, not prose.
PY_BOOK_SKIP = {"reference/grammar"}

OUT_DIR = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------------------
# R lazy-load database (janeaustenr stores its novels as character vectors in data/Rdata.rdb)
# ----------------------------------------------------------------------------------------------------------------


class _RUnserializer:
    """The subset of R's XDR serialisation format (version 2/3) needed for named lists and character vectors."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError(f"not an XDR R serialisation (header {data[:2]!r})")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self._int(), self._int()  # writer R version, minimal reader R version
        if version == 3:
            length = self._int()
            self.pos += length  # native encoding name

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _length(self) -> int:
        n = self._int()
        if n == -1:
            hi, lo = self._int(), self._int()
            n = (hi << 32) + lo
        return n

    def item(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 252, 251, 250, 242, 241):  # NULL and the special environments/values
            return None
        if kind == 255:  # reference to an earlier symbol/environment
            index = flags >> 8 or self._int()
            return self.refs[index - 1]
        if kind == 1:  # symbol
            symbol = ("symbol", self.item())
            self.refs.append(symbol)
            return symbol
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if (flags >> 12) & 4 else "utf-8")
        if kind in (2, 239):  # pairlist: list of (tag, value)
            out = []
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out.append((tag[1] if tag else None, self.item()))
                flags = self._int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if kind == 254:
                    return out
                if kind not in (2, 239):
                    raise ValueError(f"unsupported R pairlist tail of type {kind}")
        if kind in (10, 13, 14, 16, 19, 20):
            n = self._length()
            if kind in (16, 19, 20):  # character vector, list, expression
                value = [self.item() for _ in range(n)]
            elif kind == 14:
                value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
                self.pos += 8 * n
            else:
                value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
                self.pos += 4 * n
            attributes = dict(self.item()) if has_attr else {}
            if kind == 19 and "names" in attributes:
                return dict(zip(attributes["names"], value))
            return value
        raise ValueError(f"unsupported R object type {kind}")


def read_r_lazyload(base: Path) -> dict[str, object]:
    """All objects of an R lazy-load database ``base.rdx``/``base.rdb`` (zlib-compressed entries)."""
    index = _RUnserializer(gzip.decompress(base.with_suffix(".rdx").read_bytes())).item()
    if index.get("compressed") not in ([1], [True]):
        raise ValueError(f"{base}.rdb: only zlib-compressed lazy-load databases are supported")
    blob = base.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        entry = blob[int(offset) : int(offset) + int(length)]
        objects[name] = _RUnserializer(zlib.decompress(entry[4:])).item()
    return objects


# ----------------------------------------------------------------------------------------------------------------
# Jane Austen: chapters
# ----------------------------------------------------------------------------------------------------------------

_CHAPTER = re.compile(r"^(CHAPTER|Chapter) ([0-9]+|[IVXLC]+)$")
_VOLUME = re.compile(r"^VOLUME ([IVX]+)$")


def austen_chapters(lines: list[str]) -> list[dict]:
    """One dict per chapter: its volume (or None), its number as printed, and its text (heading included).

    Wrapped lines are joined into paragraphs, runs of spaces become one, ``_italic_`` marks are removed; a volume
    heading is kept at the start of the volume's first chapter ("VOLUME II\n\nCHAPTER I\n\n...")."""
    chapters: list[dict] = []
    volume, new_volume = None, False
    for line in lines:
        stripped = line.strip()
        if _VOLUME.match(stripped):
            volume, new_volume = stripped.split()[1], True
            continue
        chapter = _CHAPTER.match(stripped)
        if chapter:
            heading = f"VOLUME {volume}\n\n{stripped}" if new_volume else stripped
            chapters.append({"volume": volume, "number": chapter.group(2), "heading": heading, "body": []})
            new_volume = False
            continue
        if chapters:
            chapters[-1]["body"].append(line)
    for chapter in chapters:
        paragraphs, current = [], []
        for line in chapter.pop("body") + [""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(re.sub(r" {2,}", " ", " ".join(current)))
                current = []
        if paragraphs and paragraphs[-1] == "THE END":
            paragraphs.pop()
        body = re.sub(r"(?<![A-Za-z0-9])_([^_\n]+?)_(?![A-Za-z0-9])", r"\1", "\n\n".join(paragraphs))
        chapter["text"] = f"{chapter['heading']}\n\n{body}"
    return chapters


# ----------------------------------------------------------------------------------------------------------------
# reStructuredText (Sphinx) to plain text
# ----------------------------------------------------------------------------------------------------------------

#: Directives whose whole block is dropped.
DROP_DIRECTIVES = {
    "index", "toctree", "highlight", "sectionauthor", "moduleauthor", "tabularcolumns", "include", "literalinclude",
    "image", "figure", "audit-event", "availability", "productionlist", "testsetup", "testcleanup", "raw",
    "list-table", "csv-table", "table", "contents", "only", "miscnews", "limited-api-list", "audit-event-table",
    "program", "currentmodule", "module", "c:module", "code-block-caption", "opcode-list", "impl-detail-list",
}
#: Directives whose body is code.
CODE_DIRECTIVES = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "parsed-literal"}
#: Directives rendered as a lead-in plus their body (prose).
ADMONITIONS = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:", "caution": "Caution:",
    "impl-detail": "CPython implementation detail:", "topic": "", "sidebar": "", "rubric": "", "epigraph": "",
    "glossary": "", "hint": "Hint:", "tip": "Tip:", "attention": "Attention:", "danger": "Danger:", "admonition": "",
}
#: Object descriptions: their signature lines, then their body.
OBJECT_DIRECTIVES = {
    "function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod", "describe",
    "object", "cmdoption", "option", "envvar", "opcode", "pdbcommand", "classmethod", "staticmethod",
    "abstractmethod", "coroutinefunction", "coroutinemethod", "awaitablefunction", "awaitablemethod", "property",
}
VERSION_NOTES = {
    "versionadded": "New in version {}",
    "versionchanged": "Changed in version {}",
    "deprecated": "Deprecated since version {}",
    "deprecated-removed": "Deprecated since version {}, will be removed in version {}",
}

_DIRECTIVE = re.compile(r"^\.\.\s+([A-Za-z][\w:-]*)::\s*(.*)$")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_GRID_LINE = re.compile(r"^\s*\+[-=+]+\+\s*$")
_SIMPLE_TABLE_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")
_BULLET = re.compile(r"^([-*+\u2022]|\d+\.|#\.|\(\d+\))\s+")
_FIELD = re.compile(r"^:(?!\w+:`)[^:`]+:\s+")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _dedent(lines: list[str]) -> list[str]:
    widths = [_indent(line) for line in lines if line.strip()]
    cut = min(widths) if widths else 0
    return [line[cut:] if line.strip() else "" for line in lines]


class RstToText:
    def __init__(self, labels: dict[str, str], substitutions: dict[str, str]):
        self.labels = labels
        self.substitutions = substitutions
        self.code_chars = 0
        self.prose_chars = 0

    # -- inline markup ----------------------------------------------------------------------------------------

    def _role(self, match: re.Match) -> str:
        role, body = match.group(1) or "", match.group(2)
        explicit = re.match(r"^(.*?)\s*<([^<>]*)>$", body, re.S)
        if explicit and explicit.group(1):
            return explicit.group(1)
        target = explicit.group(2) if explicit else body
        if role in ("ref", "std:ref", "doc"):
            return self.labels.get(target.lower(), target.rsplit("/", 1)[-1].replace("-", " ").replace("_", " "))
        if role == "pep":
            return "PEP " + target.split("#")[0]
        if role == "rfc":
            return "RFC " + target.split("#")[0]
        if role in ("issue", "gh"):
            return ("bpo-" if role == "issue" else "gh-") + target
        if role == "abbr":
            return re.sub(r"\s*\(.*\)$", "", target, flags=re.S)
        if role in ("samp", "file"):
            return re.sub(r"\{([^{}]*)\}", r"\1", target)
        text = target.lstrip("!").lstrip(".")
        if text.startswith("~"):
            text = text[1:].rsplit(".", 1)[-1]
        if role in ("func", "meth", "c:func", "py:func", "py:meth") and not text.endswith(")"):
            text += "()"
        return text

    def inline(self, text: str) -> str:
        literals: list[str] = []

        def keep(value: str) -> str:
            literals.append(value)
            return f"\x00{len(literals) - 1}\x00"

        text = re.sub(r"``(.+?)``", lambda m: keep(m.group(1)), text, flags=re.S)
        text = re.sub(r"\|([^|\s][^|]*?)\|_{0,2}", lambda m: keep(self.substitutions.get(m.group(1), m.group(1))), text)
        text = re.sub(r"\\\s", "", text)  # an escaped space joins (e.g. ``x``\ s)
        text = re.sub(r"\\([^\w\s])", lambda m: keep(m.group(1)), text)  # backslash-escaped punctuation
        text = re.sub(r":(?:([\w:+-]+):)`((?:[^`\\]|\\.)+?)`", lambda m: keep(self._role(m)), text)
        text = re.sub(r"`([^`<]*?)\s*<[^<>`]*>`_{1,2}", r"\1", text)  # `text <url>`_
        text = re.sub(r"`([^`]+)`_{1,2}", r"\1", text)  # `name`_
        text = re.sub(r"`([^`]+)`", r"\1", text)  # default role
        text = re.sub(r"\s*\[(#\w*|\d+|\*)\]_", "", text)  # footnote references
        text = re.sub(r"(?<![\w*\\])\*\*(\S(?:.*?\S)?)\*\*(?![\w*])", r"\1", text, flags=re.S)
        text = re.sub(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])", r"\1", text, flags=re.S)
        text = re.sub(r"\b([A-Za-z][\w.-]*[A-Za-z0-9])__?(?=[\s.,;:)]|$)", r"\1", text)  # name_ references
        while "\x00" in text:  # a kept piece may hold further kept pieces (an escape inside a role)
            text = re.sub("\x00(\\d+)\x00", lambda m: literals[int(m.group(1))], text)
        return text

    # -- blocks ------------------------------------------------------------------------------------------------

    def code(self, lines: list[str]) -> list[str]:
        lines = _dedent(lines)
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if not lines or len(lines) > MAX_CODE_LINES:
            return []
        block = "\n".join(line.rstrip() for line in lines)
        self.code_chars += len(block)
        return [block]

    def paragraph(self, lines: list[str]) -> str:
        text = self.inline(re.sub(r" {2,}", " ", " ".join(line.strip() for line in lines)))
        self.prose_chars += len(text)
        return text

    def convert(self, lines: list[str]) -> list[str]:
        """Plain-text blocks (paragraphs, code blocks, titles) of ``lines``, which share a base indentation."""
        lines = _dedent(lines)
        blocks: list[str] = []
        i, n = 0, len(lines)
        auto_number = 0

        def indented_block(start: int, indent: int) -> int:
            """Index just past the lines from ``start`` that are blank or indented more than ``indent``."""
            j = start
            while j < n and (not lines[j].strip() or _indent(lines[j]) > indent):
                j += 1
            return j

        while i < n:
            line = lines[i]
            stripped = line.strip()
            if not stripped:
                i += 1
                continue
            indent = _indent(line)
            # Section title, with or without overline.
            overline = i + 2 < n and _UNDERLINE.match(lines[i + 2].strip()) and lines[i + 1].strip()
            if _UNDERLINE.match(stripped) and overline:
                blocks.append(self.inline(lines[i + 1].strip()))
                i += 3
                continue
            if i + 1 < n and _UNDERLINE.match(lines[i + 1].strip()) and len(lines[i + 1].strip()) >= len(stripped) - 1 \
                    and not stripped.startswith(".. ") and indent == _indent(lines[i + 1]):
                blocks.append(self.inline(stripped))
                i += 2
                continue
            # Tables.
            if _GRID_LINE.match(line):
                while i < n and lines[i].strip() and lines[i].lstrip()[:1] in "+|":
                    i += 1
                continue
            if _SIMPLE_TABLE_BORDER.match(line):
                borders = 0
                while i < n:
                    if _SIMPLE_TABLE_BORDER.match(lines[i]):
                        borders += 1
                        if borders == 3 or (borders == 2 and (i + 1 >= n or not lines[i + 1].strip())
                                            and not any(_SIMPLE_TABLE_BORDER.match(x) for x in lines[i + 1 : i + 40])):
                            i += 1
                            break
                    i += 1
                continue
            # Explicit markup.
            if stripped.startswith(".. ") or stripped == "..":
                end = indented_block(i + 1, indent)
                body = lines[i + 1 : end]
                match = _DIRECTIVE.match(stripped)
                footnote = re.match(r"^\.\. \[[^\]]+\]\s*(.*)$", stripped)
                if match:
                    blocks.extend(self.directive(match.group(1).lower(), match.group(2), body))
                elif footnote:  # footnote or citation: its text, without the label
                    text_indent = _indent(body[0]) if body and body[0].strip() else indent + 3
                    blocks.extend(self.convert([" " * text_indent + footnote.group(1)] + body))
                # else: comment, hyperlink target or substitution definition: dropped.
                i = end
                continue
            # Doctest block.
            if stripped.startswith(">>>"):
                j = i
                while j < n and lines[j].strip():
                    j += 1
                blocks.extend(self.code(lines[i:j]))
                i = j
                continue
            # Transition line.
            if _UNDERLINE.match(stripped):
                i += 1
                continue
            # List item or field: its first line and the lines indented below it, converted on their own.
            item = _BULLET.match(stripped) or _FIELD.match(stripped)
            auto_number = auto_number + 1 if item and item.group(0).strip() == "#." else 0
            if item:
                marker = item.group(0)
                end = indented_block(i + 1, indent)
                rest = lines[i + 1 : end]
                text_indent = _indent(rest[0]) if rest and rest[0].strip() else indent + len(marker)
                inner = self.convert([" " * text_indent + stripped[len(marker) :]] + rest)
                label = marker.strip()
                if inner:
                    if label in ("*", "-", "+", "\u2022"):
                        label = "-"
                    elif label == "#.":
                        label = f"{auto_number}."  # auto-numbered list, as rendered
                    elif label.startswith(":"):
                        label = label[1:]  # field name, as rendered: "Release: 3.11"
                    inner[0] = f"{label} {inner[0]}"
                blocks.extend(inner)
                i = end
                continue
            # Paragraph (or definition term): lines up to a blank line or an indent change.
            j = i + 1
            while j < n and lines[j].strip() and _indent(lines[j]) == indent and not lines[j].strip().startswith(".. "):
                j += 1
            para = lines[i:j]
            literal = False
            if para[-1].rstrip().endswith("::"):
                literal = True
                last = para[-1].rstrip()[:-2].rstrip()
                para = para[:-1] + ([last + (":" if not last.endswith((" ", ":")) and last else "")] if last else [])
            if para:
                blocks.append(self.paragraph(para))
            i = j
            # An indented block after a paragraph: a literal block after "::", else a block quote / definition.
            k = i
            while k < n and not lines[k].strip():
                k += 1
            if k < n and _indent(lines[k]) > indent:
                end = indented_block(k, indent)
                if literal:
                    blocks.extend(self.code(lines[k:end]))
                else:
                    blocks.extend(self.convert(lines[k:end]))
                i = end
        return [b for b in blocks if b.strip()]

    def directive(self, name: str, argument: str, body: list[str]) -> list[str]:
        # The lines before the first blank one hold the options (":noindex:", ":module: x", ...) and, for object
        # descriptions, further signature lines; for other directives, non-option lines there are already body.
        head = []
        while body and body[0].strip():
            head.append(body[0])
            body = body[1:]
        option = re.compile(r"^:[\w-]+:(\s|$)")
        signatures = [argument] if argument else []
        kept = []
        for line in head:
            if option.match(line.strip()) and not kept:
                continue
            if name in OBJECT_DIRECTIVES or name.startswith("c:"):
                if not option.match(line.strip()):
                    signatures.append(line.strip())
            else:
                kept.append(line)
        body = kept + body
        if name in DROP_DIRECTIVES:
            return []
        if name in CODE_DIRECTIVES:
            return self.code(body)
        if name in VERSION_NOTES:
            versions = argument.split(None, 2)
            if name == "deprecated-removed":
                lead = VERSION_NOTES[name].format(*(versions + ["?", "?"])[:2])
                rest = " ".join(versions[2:])
            else:
                lead = VERSION_NOTES[name].format(versions[0] if versions else "?")
                rest = " ".join(versions[1:])
            inner = self.convert(body)
            rest = self.inline(rest)
            if not rest and inner and "\n" not in inner[0]:
                rest = inner.pop(0)
            return [f"{lead}: {rest}" if rest else f"{lead}."] + inner
        if name in ADMONITIONS:
            lead = ADMONITIONS[name]
            head = " ".join(x for x in [lead, self.inline(argument)] if x)
            inner = self.convert(body)
            if head and inner and "\n" not in inner[0] and name not in ("rubric", "topic", "sidebar"):
                return [head + " " + inner.pop(0)] + inner
            return ([head] if head else []) + inner
        # Object descriptions (function, method, class, c:function, cmdoption, ...): signature line(s), then body.
        signatures = [self.inline(x) for x in signatures]
        if name == "class" and signatures:
            signatures = ["class " + s for s in signatures]
        elif name in ("exception",) and signatures:
            signatures = ["exception " + s for s in signatures]
        elif name in ("decorator", "decoratormethod") and signatures:
            signatures = ["@" + s for s in signatures]
        elif name in ("coroutinefunction", "coroutinemethod") and signatures:
            signatures = ["coroutine " + s for s in signatures]
        elif name in ("classmethod", "staticmethod", "abstractmethod") and signatures:
            signatures = [name + " " + s for s in signatures]
        return signatures + self.convert(body)


def rst_labels(sources: Path) -> dict[str, str]:
    """Map each ``.. _label:`` target that precedes a section title to that title (what Sphinx renders for :ref:)."""
    labels: dict[str, str] = {}
    plain = RstToText({}, {})
    for path in sorted(sources.rglob("*.rst.txt")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            match = re.match(r"^\.\. _([^:`]+):\s*$", line.strip())
            if not match:
                continue
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or re.match(r"^\.\. _[^:]+:\s*$", lines[j].strip())):
                j += 1
            if j + 1 < len(lines) and _UNDERLINE.match(lines[j].strip()):
                j += 1  # overline
            if j + 1 < len(lines) and _UNDERLINE.match(lines[j + 1].strip()) and lines[j].strip():
                labels[match.group(1).strip().lower()] = plain.inline(lines[j].strip())
    return labels


def rst_to_text(path: Path, labels: dict[str, str]) -> tuple[str, str, float]:
    """(title, plain text, code fraction) of one page."""
    raw = path.read_text(encoding="utf-8")
    substitutions = {"release": "3.11", "version": "3.11", "today": "", "nbsp": " ", "l": ""}
    for name, value in re.findall(r"^\.\. \|([^|]+)\| replace::\s*(.*)$", raw, flags=re.M):
        substitutions[name] = value
    converter = RstToText(labels, {})
    substitutions = {k: converter.inline(v) for k, v in substitutions.items()}
    converter.substitutions = substitutions
    blocks = converter.convert(raw.splitlines())
    text = "\n\n".join(b.strip("\n") for b in blocks)
    text = re.sub(r"[ \t]+\n", "\n", text)
    title = blocks[0] if blocks else path.name
    total = converter.code_chars + converter.prose_chars
    return title, text.strip() + "\n", (converter.code_chars / total if total else 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------------


def package_version(package: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Status}|${Version}", package], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    status, _, version = out.partition("|")
    if "installed" not in status.split() or not version:
        sys.exit(f"error: Debian package {package} is not installed: apt-get install --no-install-recommends {package}")
    return version


def load_count_tokens(tokenizer_dir: str | None):
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        from effconv.loading import load_tokenizer, resolve_model_source

        tokenizer = load_tokenizer(resolve_model_source(None))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return tokenizer, count


def book_pages(book: str) -> list[str]:
    """The pages of a documentation book (a folder whose index.rst has one toctree), in reading order."""
    index = (PY_SOURCES / book / "index.rst.txt").read_text(encoding="utf-8")
    toctree = index.split(".. toctree::", 1)[1]
    names = re.findall(r"^\s+([a-z_0-9./]+?)(?:\.rst)?\s*$", toctree, flags=re.M)
    return [f"{book}/{name}" for name in names if f"{book}/{name}" not in PY_BOOK_SKIP]


def python_documents(count_tokens, versions: dict[str, str]) -> list[dict]:
    """Every eligible page (or book, for PY_BOOKS) of the Python documentation, with its token count."""
    labels = rst_labels(PY_SOURCES)
    in_books = {page: book for book in PY_BOOKS for page in book_pages(book)}
    units: list[tuple[str, str, list[str]]] = [(book, "whole book", book_pages(book)) for book in PY_BOOKS]
    for path in sorted(PY_SOURCES.rglob("*.rst.txt")):
        page = path.relative_to(PY_SOURCES).as_posix()[: -len(".rst.txt")]
        if page in PY_EXCLUDE or page in in_books or path.stat().st_size < 20_000:  # too short for MIN_TOKENS
            continue
        units.append((page, "page", [page]))
    documents = []
    for group, kind, pages in units:
        texts, code_chars, chars = [], 0.0, 0
        for page in pages:
            title, text, code_fraction = rst_to_text(PY_SOURCES / f"{page}.rst.txt", labels)
            texts.append(text)
            code_chars += code_fraction * len(text)
            chars += len(text)
            if page == pages[0] or page == f"{group}/index":
                first_title = title
        if kind == "whole book":
            first_title = PY_BOOKS[group]
        text = "\n".join(texts)
        code_fraction = code_chars / chars
        if code_fraction > MAX_CODE_FRACTION:
            continue
        tokens = count_tokens(text)
        if tokens < MIN_TOKENS:
            continue
        where = f"{PY_SOURCES}/{group}.rst.txt" if kind == "page" else f"{PY_SOURCES}/{group}/ ({len(pages)} pages)"
        documents.append({
            "text": text,
            "source": f"{PY_PACKAGE} {versions[PY_PACKAGE]}: {where}",
            "genre": "technical",
            "title": f"Python {PY_VERSION} documentation, {group} ({kind}): {first_title}",
            "group": group,
            "tokens": tokens,
            "code_fraction": round(code_fraction, 3),
        })
    return documents


def split_technical(documents: list[dict]) -> dict[str, list[dict]]:
    strata = {
        "long": [d for d in documents if d["tokens"] >= LONG_MIN_TOKENS],
        "standard": [d for d in documents if d["tokens"] < LONG_MIN_TOKENS],
    }
    splits: dict[str, list[dict]] = {"test": [], "validation": []}
    for kind, pool in strata.items():
        pool = sorted(pool, key=lambda d: d["group"])
        random.Random(f"{SEED}:technical:{kind}").shuffle(pool)
        for split in ("test", "validation"):
            take = TECH_COUNTS[split][kind]
            if len(pool) < take:
                sys.exit(f"error: only {len(pool)} {kind} technical pages left, {take} wanted for {split}")
            splits[split].extend(pool[:take])
            pool = pool[take:]
    return splits


def _chapter_span(first: dict, last: dict) -> str:
    if first is last:
        return f"Volume {first['volume']}, chapter {first['number']}" if first["volume"] else f"chapter {first['number']}"
    if first["volume"] == last["volume"]:
        volume = f"Volume {first['volume']}, " if first["volume"] else ""
        return f"{volume}chapters {first['number']} to {last['number']}"
    return f"Volume {first['volume']} chapter {first['number']} to Volume {last['volume']} chapter {last['number']}"


def fiction_runs(
    name: str, chapters: list[dict], count_tokens, targets: list[int], versions: dict[str, str]
) -> list[dict]:
    """Consecutive runs of whole chapters from the opening of a novel, the k-th run reaching ``targets[k]`` tokens."""
    runs, start = [], 0
    for position, target in enumerate(targets):
        end, tokens = start, 0
        while tokens < target:
            if end >= len(chapters):
                sys.exit(f"error: {name} has too few chapters for runs of {targets} tokens")
            end += 1
            text = "\n\n".join(chapter["text"] for chapter in chapters[start:end]) + "\n"
            tokens = count_tokens(text)
        runs.append({
            "text": text,
            "source": f"{AUSTEN_PACKAGE} {versions[AUSTEN_PACKAGE]}: {AUSTEN_DB}.rdb, object {name}",
            "genre": "fiction",
            "title": f"Jane Austen, {AUSTEN_TITLES[name]}, {_chapter_span(chapters[start], chapters[end - 1])}",
            "group": name,
            "order": position,
            "tokens": tokens,
            "chapters": [start + 1, end],
        })
        start = end
    return runs


def split_fiction(count_tokens, versions: dict[str, str]) -> dict[str, list[dict]]:
    novels = read_r_lazyload(AUSTEN_DB)
    names = sorted(AUSTEN_TITLES)
    if sorted(novels) != names:
        sys.exit(f"error: unexpected objects in {AUSTEN_DB}.rdb: {sorted(novels)}")
    random.Random(f"{SEED}:fiction").shuffle(names)
    splits: dict[str, list[dict]] = {"test": [], "validation": []}
    for split in ("test", "validation"):
        chosen, names = names[: FICTION_NOVELS[split]], names[FICTION_NOVELS[split] :]
        for position, name in enumerate(chosen):
            long = position < FICTION_LONG_NOVELS[split]
            targets = [FICTION_STD_TARGET] * FICTION_DOCS_PER_NOVEL
            if long:
                targets[0] = FICTION_LONG_TARGET
            splits[split].extend(fiction_runs(name, austen_chapters(novels[name]), count_tokens, targets, versions))
    return splits


def summarise(manifest: dict) -> str:
    rows = [
        "| split | genre | documents | tokens | min | median | max | ≥ 33K tokens |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for split in ("test", "validation"):
        docs = manifest["splits"][split]
        for genre in sorted({d["genre"] for d in docs}) + ["all"]:
            tokens = [d["tokens"] for d in docs if genre in ("all", d["genre"])]
            rows.append(
                f"| {split} | {genre} | {len(tokens)} | {sum(tokens):,} | {min(tokens):,} | {int(statistics.median(tokens)):,} "
                f"| {max(tokens):,} | {sum(t >= LONG_MIN_TOKENS for t in tokens)} |"
            )
    lines = ["Tokens are SmolLM2 tokenizer tokens (no special tokens).", "", *rows, ""]
    for split in ("test", "validation"):
        lines.append(f"Documents in `{split}.jsonl`:")
        lines.append("")
        for d in manifest["splits"][split]:
            lines.append(f"- {d['genre']}: {d['title']} ({d['tokens']:,} tokens)")
        lines.append("")
    return "\n".join(lines)


def notice(versions: dict[str, str]) -> str:
    """Attribution and licence texts, copied from the installed packages."""
    licence = (PY_SOURCES / "license.rst.txt").read_text(encoding="utf-8")
    terms = licence[licence.index("Terms and conditions for accessing") : licence.index(".. _OtherLicenses:")]
    copyright_page = (PY_SOURCES / "copyright.rst.txt").read_text(encoding="utf-8")
    copyright_page = copyright_page[copyright_page.index("Python and this documentation") : copyright_page.index("-------")]
    austen = Path(f"/usr/share/doc/{AUSTEN_PACKAGE}/copyright").read_text(encoding="utf-8")
    return f"""# Notices for the long-document evaluation corpus (data/long)

The files `test.jsonl` and `validation.jsonl` hold text from two Debian packages. This file is written by
`build.py` from the licence files installed with them.

## Genre `technical`: the Python 3.11 documentation

Source: Debian package `{PY_PACKAGE}` {versions[PY_PACKAGE]}, the reStructuredText sources of the documentation
(`{PY_SOURCES}`).

{copyright_page.strip()}

Changes made (as the PSF License Agreement, clause 3, asks): each page was converted from reStructuredText to plain
text by `data/long/build.py`: markup, index entries, tables, grammar listings, images and code blocks longer than 30
lines were removed; cross-references were replaced by their text; the pages of the Tutorial and of the Language
Reference were joined, in reading order, into one document each. Nothing was otherwise edited.

The licence text, verbatim from `license.rst.txt` of the package (`|release|` stands for 3.11):

```
{terms.strip()}
```

## Genre `fiction`: Jane Austen's novels

Source: Debian package `{AUSTEN_PACKAGE}` {versions[AUSTEN_PACKAGE]} (the CRAN package janeaustenr by Julia Silge),
which holds the text of Jane Austen's six completed novels as transcribed by Project Gutenberg. The novels
(1811-1817) are in the public domain. The documents here are runs of whole chapters, with line wrapping undone,
`_italic_` marks removed and runs of spaces collapsed.

The package's copyright file, verbatim:

```
{austen.strip()}
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer directory (default: effconv's SmolLM2 teacher)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: data/long)")
    args = parser.parse_args()

    versions = {p: package_version(p) for p in (PY_PACKAGE, AUSTEN_PACKAGE)}
    tokenizer, count_tokens = load_count_tokens(args.tokenizer)
    technical = split_technical(python_documents(count_tokens, versions))
    fiction = split_fiction(count_tokens, versions)

    manifest = {
        "seed": SEED,
        "min_tokens": MIN_TOKENS,
        "long_min_tokens": LONG_MIN_TOKENS,
        "tokenizer": args.tokenizer or "SmolLM2-135M-Instruct (effconv.loading default teacher)",
        "tokenizer_vocab": len(tokenizer),
        "packages": versions,
        "splits": {},
    }
    seen: dict[str, str] = {}
    for split in ("test", "validation"):
        docs = technical[split] + fiction[split]
        docs.sort(key=lambda d: (d["genre"], d["group"], d.get("order", 0)))
        with open(args.out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for d in docs:
                digest = hashlib.sha256(d["text"].encode()).hexdigest()
                if d["group"] in seen and seen[d["group"]] != split:
                    sys.exit(f"error: {d['group']} would be in two splits")
                seen[d["group"]] = split
                record = {key: d[key] for key in ("text", "source", "genre", "title")}
                line = json.dumps(record, ensure_ascii=False)
                for char in ("\u2028", "\u2029", "\x85"):  # str.splitlines() would split a line at these
                    line = line.replace(char, f"\\u{ord(char):04x}")
                f.write(line + "\n")
                entry = {k: v for k, v in d.items() if k != "text"}
                entry.update(sha256=digest, chars=len(d["text"]))
                manifest["splits"].setdefault(split, []).append(entry)
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    (args.out / "NOTICE.md").write_text(notice(versions), encoding="utf-8")
    stats = summarise(manifest)
    readme = args.out / "README.md"
    if readme.exists():
        content = readme.read_text(encoding="utf-8")
        begin, end = "<!-- stats:begin (written by build.py) -->", "<!-- stats:end -->"
        if begin in content and end in content:
            head, rest = content.split(begin, 1)
            content = head + begin + "\n" + stats + "\n" + end + rest.split(end, 1)[1]
            readme.write_text(content, encoding="utf-8")
    print(stats)


if __name__ == "__main__":
    main()
