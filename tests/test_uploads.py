"""CsvInspector: incremental checks of an upload's bytes, independent of chunking."""

from __future__ import annotations

import csv
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.errors import ApiError
from service.uploads import CsvInspector, CsvSummary


def inspect(data: bytes, chunk: int | None = None) -> CsvSummary:
    inspector = CsvInspector()
    step = chunk or max(1, len(data))
    for start in range(0, len(data), step):
        inspector.feed(data[start : start + step])
    return inspector.finish()


@pytest.mark.parametrize(
    ("data", "columns", "rows"),
    [
        (b"Email,Name\na@b.co,A\nc@d.co,C\n", ("Email", "Name"), 2),
        (b"Email,Name\r\na@b.co,A\r\n", ("Email", "Name"), 1),
        (b"\xef\xbb\xbfEmail,Name\na@b.co,A\n", ("Email", "Name"), 1),
        (b'Email,Note\na@b.co,"two\nlines"\nc@d.co,"say ""hi"""\n', ("Email", "Note"), 2),
        (b"Email\na@b.co", ("Email",), 1),
        (b"Email\n\na@b.co\n\r\n\nc@d.co\n\n", ("Email",), 2),
        (b'"Quoted, header",B\n1,2\n', ("Quoted, header", "B"), 1),
        ("Émail,Nåme\nü@x.de,Jürgen\n".encode(), ("Émail", "Nåme"), 1),
    ],
)
def test_summaries(data: bytes, columns: tuple[str, ...], rows: int) -> None:
    for chunk in (None, 1, 3):
        summary = inspect(data, chunk)
        assert (summary.columns, summary.rows, summary.size) == (columns, rows, len(data))


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"\n\n\n", "no_header"),
        (b",,\n1,2\n", "no_header"),
        (b"Email,Name\n", "no_rows"),
        (b"Email,Name\n\n\n", "no_rows"),
        (b"Email\x00,Name\n1,2\n", "binary_file"),
        (b"Email,Name\n\xc3\x28,x\n", "not_utf8"),
        (b"Email,Name\na@b.co,\xe2\x82", "not_utf8"),
        (b"x" * (1 << 20) + b"y" * 10 + b"\n1\n", "no_header"),
    ],
)
def test_problems_have_stable_codes(data: bytes, code: str) -> None:
    for chunk in (None, 7):
        with pytest.raises(ApiError) as caught:
            inspect(data, chunk)
        assert caught.value.code == code
        assert caught.value.status == 400


def test_a_multibyte_character_split_across_chunks_is_fine() -> None:
    data = "Name\nJürgen\n".encode()
    split = data.index(b"\xc3") + 1
    inspector = CsvInspector()
    inspector.feed(data[:split])
    inspector.feed(data[split:])
    assert inspector.finish().rows == 1


def test_huge_column_counts_and_long_lines() -> None:
    header = ",".join(f"c{i}" for i in range(5000))
    data = (header + "\n" + "v," * 4999 + "v\n" + "z" * 500_000 + "\n").encode()
    summary = inspect(data, 65536)
    assert (len(summary.columns), summary.rows) == (5000, 2)


rows = st.lists(
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00\r"),
            max_size=8,
        ),
        min_size=1,
        max_size=4,
    ),
    min_size=1,
    max_size=12,
)


@given(body=rows, chunk=st.integers(1, 64), crlf=st.booleans())
def test_row_count_matches_the_csv_module_whatever_the_chunking(
    body: list[list[str]], chunk: int, crlf: bool
) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n" if crlf else "\n")
    writer.writerow(["Email", "Name"])
    writer.writerows(body)
    data = out.getvalue().encode()
    expected = sum(1 for record in csv.reader(io.StringIO(out.getvalue())) if record) - 1
    if expected < 1:
        with pytest.raises(ApiError):
            inspect(data, chunk)
        return
    assert inspect(data, chunk).rows == expected
    assert inspect(data).rows == expected
