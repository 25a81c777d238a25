"""Reading manifest files: every format, and a located message for every kind of broken file."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.reader import parse_manifest, read_manifest
from schemas.errors import ManifestError


def test_csv_with_bom_crlf_and_quoted_commas_quotes_and_newlines() -> None:
    data = ('\ufeffid,Title,prompt\r\n'
            'a,"Shoe, red","He said ""hi"""\r\n'
            'b,"Two\r\nlines",plain\r\n').encode()
    raw = parse_manifest(data, "c.csv", "csv")
    assert [r.values for r in raw.records] == [
        {"id": "a", "Title": "Shoe, red", "prompt": 'He said "hi"'},
        {"id": "b", "Title": "Two\r\nlines", "prompt": "plain"},
    ]
    assert [(r.number, r.line) for r in raw.records] == [(1, 2), (2, 3)]
    assert list(raw.records)[1].where == "c.csv line 3"


def test_line_numbers_follow_multiline_records_and_skip_blank_rows() -> None:
    raw = parse_manifest(b'id,prompt\na,"x\ny"\n,\nb,z\n', "c.csv", "csv")
    assert [(r.values["id"], r.line) for r in raw.records] == [("a", 2), ("b", 5)]


def test_tsv_by_extension_and_by_content(tmp_path: Path) -> None:
    path = tmp_path / "m.tsv"
    path.write_text("id\tprompt\n1\ta, b\n", encoding="utf-8")
    assert next(iter(read_manifest(path).records)).values == {"id": "1", "prompt": "a, b"}
    assert parse_manifest(b"id\tprompt\n1\tx\n", "noext").format == "tsv"


def test_json_list_document_and_jsonl() -> None:
    assert next(iter(parse_manifest(b'[{"prompt": "x"}]', "m.json").records)).where == "m.json [0]"
    doc = parse_manifest(b'{"items": [{"id": "a"}], "defaults": {"steps": 4}, "prompt": "p {id}",'
                         b' "matrix": {"bg": ["white", "grey"]}}', "m.json")
    assert (doc.defaults, doc.prompt, doc.matrix) == ({"steps": 4}, "p {id}", {"bg": ["white", "grey"]})
    assert next(iter(doc.records)).where == "m.json items[0]"
    lines = parse_manifest(b'{"prompt": "a"}\n\n{"prompt": "b"}\n', "m.jsonl")
    assert lines.format == "jsonl"
    assert [r.where for r in lines.records] == ["m.jsonl line 1", "m.jsonl line 3"]


@pytest.mark.parametrize(("data", "name", "expected"), [
    (b"", "m.csv", "m.csv: is empty"),
    (b"id,prompt\n", "m.csv", "m.csv: has a header but no rows"),
    (b"id,prompt\nok,caf\xe9\n", "m.csv", "m.csv line 2: is not valid UTF-8 (byte 0xE9 at column 7): save it as UTF-8"),
    (b'id,id\n1,2\n', "m.csv", 'm.csv line 1: column "id" appears twice'),
    (b'id,,x\n1,2,3\n', "m.csv", "m.csv line 1: column 2 has no name"),
    (b'id,prompt\n1,a,b\n', "m.csv", "m.csv line 2: has 3 fields but the header has 2"),
    (b'id,prompt\n1,"unclosed\n', "m.csv", "is not valid CSV"),
    (b'[{"prompt": "x"},\n {"prompt": }]', "m.json", "m.json line 2: is not valid JSON: Expecting value (column 13)"),
    (b'{"prompt": "a"}\n{"prompt": \n', "m.jsonl", "m.jsonl line 2: is not valid JSON"),
    (b'[1, 2]', "m.json", "m.json [0]: each row must be an object, got int"),
    (b'{"itemz": []}', "m.json", "unknown top-level key 'itemz'"),
    (b'{"prompt": "x"}', "m.json", "has no 'items'"),
    (b'{"items": []}', "m.json", "m.json: has no rows"),
    (b'{"items": [{}], "matrix": {"bg": []}}', "m.json", "matrix 'bg' must be a non-empty list"),
    (b'{"items": [{}], "matrix": {"bg": [{"a": 1}]}}', "m.json", "matrix 'bg' values must be text or numbers"),
    (b'"just text"', "m.json", "must hold a list of rows or an object with 'items'"),
])
def test_broken_files_are_rejected_with_where_and_what(data: bytes, name: str, expected: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, name)
    assert expected in str(info.value)


def test_missing_file_and_folder_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match="is a folder"):
        read_manifest(tmp_path)


def test_oversized_manifest_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.csv"
    path.write_text("id,prompt\n1,xxxxxxxx\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"is 21 bytes; the limit is 10 \(--max-bytes, KILN_MAX_MANIFEST_BYTES\)"):
        read_manifest(path, max_bytes=10)
    assert len(list(read_manifest(path, max_bytes=21).records)) == 1
