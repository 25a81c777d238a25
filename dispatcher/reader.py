"""Reading manifest files: bytes in, located records out. CSV, TSV, JSON and JSONL.

A CSV, TSV or JSONL file is read as a stream: its records come one at a time, so a million-row manifest is never
held whole (a JSON document is one value and is read at once). A broken file raises its ManifestError when the
reading reaches the break.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.errors import ManifestError, Problem
from schemas.manifest import MAX_MANIFEST_BYTES

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}
DOCUMENT_KEYS = {"items", "defaults", "prompt", "matrix"}


@dataclass(frozen=True, slots=True)
class Record:
    """One manifest row with where it stands in the file."""

    where: str  # "catalog.csv line 14" or "looks.json items[3]"
    number: int  # 1-based record number
    line: int  # 1-based line where the record starts (0 when the format has no lines for it)
    values: dict[str, Any]


@dataclass
class RawManifest:
    """A parsed manifest before validation: its records (a list, or a stream read once) plus a JSON document's
    shared parts."""

    name: str
    format: str
    records: Iterable[Record]
    defaults: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    matrix: dict[str, list[Any]] = field(default_factory=dict)


def read_manifest(path: Path, fmt: str | None = None, max_bytes: int = MAX_MANIFEST_BYTES) -> RawManifest:
    """Open a manifest file, or raise ManifestError naming the file and what to fix. A CSV, TSV or JSONL file's
    records are streamed from the file as they are iterated (once)."""
    name = path.name
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _fail(name, f"is {size:,} bytes; the limit is {max_bytes:,} (--max-bytes, "
                              "KILN_MAX_MANIFEST_BYTES): split it into several manifests, or raise the limit")
        fmt = fmt or FORMATS.get(path.suffix.lower())
        if fmt in ("csv", "tsv", "jsonl") and path.is_file():
            records = _parse_jsonl(_file_lines(path), name) if fmt == "jsonl" else _parse_table(
                _file_lines(path), name, fmt)
            return RawManifest(name, fmt, records)
        data = path.read_bytes()
    except FileNotFoundError:
        raise _fail(name, f"not found: {path}") from None
    except IsADirectoryError:
        raise _fail(name, "is a folder: give a .csv, .tsv, .json or .jsonl file") from None
    except OSError as exc:
        raise _fail(name, f"cannot be read: {exc.strerror}") from None
    return parse_manifest(data, name, fmt)


def parse_manifest(data: bytes, name: str, fmt: str | None = None) -> RawManifest:
    """Parse manifest bytes, all records at once; the format comes from `fmt`, else the name's extension, else the
    content."""
    text = _decode(data, name)
    if not text.strip():
        raise _fail(name, "is empty: a manifest needs a header row and at least one row")
    fmt = fmt or FORMATS.get(Path(name).suffix.lower()) or _sniff(text)
    lines = io.StringIO(text, newline="")
    if fmt in ("csv", "tsv"):
        return RawManifest(name, fmt, list(_parse_table(lines, name, fmt)))
    if fmt == "jsonl":
        return RawManifest(name, fmt, list(_parse_jsonl(lines, name)))
    return _parse_json(text, name)


def _file_lines(path: Path) -> Iterator[str]:
    """A text file's lines as read, endings kept; a byte that is not UTF-8 gets the located message of `_decode`
    (which reads the file whole, once, only then)."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        try:
            yield from fh
        except UnicodeDecodeError:
            _decode(path.read_bytes(), path.name)
            raise


def _fail(name: str, message: str, where: str = "") -> ManifestError:
    return ManifestError([Problem(where or name, message)])


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise _fail(name, f"is not valid UTF-8 (byte 0x{data[exc.start]:02X} at column {column}): save it as "
                          "UTF-8 (Excel: Save As > 'CSV UTF-8'; LibreOffice: character set 'Unicode (UTF-8)')",
                    f"{name} line {line}") from None


def _sniff(text: str) -> str:
    head = text.lstrip()
    if head.startswith("["):
        return "json"
    if head.startswith("{"):
        try:
            json.loads(text)
            return "json"
        except json.JSONDecodeError as exc:
            return "jsonl" if exc.msg == "Extra data" else "json"
    first = head.splitlines()[0]
    return "tsv" if "\t" in first and "," not in first else "csv"


def _parse_table(lines: Iterable[str], name: str, fmt: str) -> Iterator[Record]:
    reader = csv.reader(lines, delimiter="\t" if fmt == "tsv" else ",", strict=True)
    try:
        header = [h.strip() for h in next(reader, [])]
        if not any(header):
            raise _fail(name, "is empty: a manifest needs a header row and at least one row")
        problems = [Problem(f"{name} line 1", f"column {i + 1} has no name: give every column a header")
                    for i, h in enumerate(header) if not h]
        dupes = sorted({h for h in header if h and header.count(h) > 1})
        problems += [Problem(f"{name} line 1", f'column "{h}" appears twice: column names must be unique')
                     for h in dupes]
        if problems:
            raise ManifestError(problems)
        number = 0
        start = reader.line_num + 1
        for cells in reader:
            where = f"{name} line {start}"
            if len(cells) > len(header) and any(c.strip() for c in cells[len(header):]):
                raise _fail(name, f"has {len(cells)} fields but the header has {len(header)}: "
                                  "quote values that contain the delimiter", where)
            if any(c.strip() for c in cells):
                number += 1
                yield Record(where, number, start, {h: c for h, c in zip(header, cells, strict=False)})
            start = reader.line_num + 1
    except csv.Error as exc:
        raise _fail(name, f"is not valid {fmt.upper()}: {exc}", f"{name} line {reader.line_num}") from None
    if not number:
        raise _fail(name, "has a header but no rows")


def _load_json(text: str, name: str, line_offset: int = 0) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(name, f"is not valid JSON: {exc.msg} (column {exc.colno})",
                    f"{name} line {exc.lineno + line_offset}") from None


def _parse_jsonl(lines: Iterable[str], name: str) -> Iterator[Record]:
    number = 0
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        value = _load_json(line.rstrip("\r\n"), name, line_number - 1)
        where = f"{name} line {line_number}"
        if not isinstance(value, dict):
            raise _fail(name, f"each line must be a JSON object, got {type(value).__name__}", where)
        number += 1
        yield Record(where, number, line_number, value)
    if not number:
        raise _fail(name, "has no rows")


def _parse_json(text: str, name: str) -> RawManifest:
    doc = _load_json(text, name)
    if isinstance(doc, list):
        return RawManifest(name, "json", _items(doc, name, f"{name} "))
    if not isinstance(doc, dict):
        raise _fail(name, "must hold a list of rows or an object with 'items'")
    unknown = sorted(set(doc) - DOCUMENT_KEYS)
    if unknown:
        raise _fail(name, f"unknown top-level key {unknown[0]!r}: allowed are {', '.join(sorted(DOCUMENT_KEYS))}")
    if "items" not in doc:
        raise _fail(name, "has no 'items': put the rows in a list under 'items'")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise _fail(name, "'defaults' must be an object of field values")
    prompt = doc.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise _fail(name, "'prompt' must be a text template")
    return RawManifest(name, "json", _items(doc["items"], name, f"{name} items"), defaults, prompt,
                       _matrix(doc.get("matrix") or {}, name))


def _items(items: Any, name: str, prefix: str) -> list[Record]:
    if not isinstance(items, list):
        raise _fail(name, "'items' must be a list of row objects")
    if not items:
        raise _fail(name, "has no rows")
    records = []
    for i, item in enumerate(items):
        where = f"{prefix}[{i}]"
        if not isinstance(item, dict):
            raise _fail(name, f"each row must be an object, got {type(item).__name__}", where)
        records.append(Record(where, i + 1, 0, item))
    return records


def _matrix(matrix: Any, name: str) -> dict[str, list[Any]]:
    if not isinstance(matrix, dict):
        raise _fail(name, "'matrix' must map a variable name to a list of values")
    for key, values in matrix.items():
        if not isinstance(values, list) or not values:
            raise _fail(name, f"matrix '{key}' must be a non-empty list of values")
        if any(isinstance(v, dict | list) for v in values):
            raise _fail(name, f"matrix '{key}' values must be text or numbers")
    return matrix
