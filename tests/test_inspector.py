"""CsvInspector: incremental CSV checks whose outcome does not depend on the chunking."""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Iterator
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import ApiError
from service.uploads import csv_checks as inspection
from service.uploads.receiving import CsvInspector, CsvSummary

from .helpers import split_at

# -- CsvInspector ----------------------------------------------------------------------

Outcome = CsvSummary | tuple[str, str]  # a summary, or an error's (code, message)


def inspect(chunks: list[bytes], **options: int) -> CsvSummary:
    inspector = CsvInspector(**options)
    for chunk in chunks:
        inspector.feed(chunk)
    return inspector.finish()


def outcome(chunks: list[bytes], **options: int) -> Outcome:
    try:
        return inspect(chunks, **options)
    except ApiError as exc:
        assert exc.status == 400
        return exc.code, exc.message


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


def chunkings(data: bytes) -> Iterator[list[bytes]]:
    """Whole, byte by byte, a few fixed sizes, and random cuts."""
    yield [data]
    for size in (1, 2, 3, 7, 64):
        yield split_every(data, size)
    rng = random.Random(data)
    for _ in range(5):
        yield split_at(data, [rng.randrange(len(data) + 1) for _ in range(rng.randrange(8))])


@pytest.mark.parametrize(
    ("data", "columns", "rows"),
    [
        pytest.param(b"Email,Name\na@b.co,A\nc@d.co,C\n", ("Email", "Name"), 2, id="simple"),
        pytest.param(b"Email,Name\r\na@b.co,A\r\nc@d.co,C\r\n", ("Email", "Name"), 2, id="crlf"),
        pytest.param(b"\xef\xbb\xbfEmail,Name\na@b.co,A\n", ("Email", "Name"), 1, id="bom"),
        pytest.param(
            b'Email,Note\na@b.co,"two\nlines"\nc@d.co,"say ""hi"""\n"e@f.co","x\r\n\r\ny"\n',
            ("Email", "Note"),
            3,
            id="quoted-newlines-and-escapes",
        ),
        pytest.param(b'"Quoted, ""header""",B\n1,2\n', ('Quoted, "header"', "B"), 1, id="q-head"),
        pytest.param(b'"multi\nline",B\r\n1,2\r\n', ("multi\nline", "B"), 1, id="ml-header"),
        pytest.param(b"Email\na@b.co", ("Email",), 1, id="no-trailing-newline"),
        pytest.param(b"Email\r\na@b.co\r", ("Email",), 1, id="no-trailing-lf-after-cr"),
        pytest.param(b"Email\n\na@b.co\n\r\n\r\r\n\nc@d.co\n\n", ("Email",), 2, id="blank-lines"),
        pytest.param(b'Email\n""\n', ("Email",), 1, id="empty-quoted-field-is-a-record"),
        pytest.param(b"Email\n \n", ("Email",), 1, id="a-space-is-content"),
        pytest.param(b"a,,a,\n1,2,3,4\n", ("a", "", "a", ""), 1, id="dup-and-empty-names"),
        pytest.param("Émail,Nåme\nü@x.de,Jürgen\n".encode(), ("Émail", "Nåme"), 1, id="utf8"),
        pytest.param(b'Email\n"never closed\nx\n', ("Email",), 1, id="unclosed-quote"),
    ],
)
def test_summaries_do_not_depend_on_chunking(
    data: bytes, columns: tuple[str, ...], rows: int
) -> None:
    for chunks in chunkings(data):
        assert outcome(chunks) == CsvSummary(columns, rows, len(data)), chunks


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"\n\n\n", "no_header"),
        (b"\r\n", "no_header"),
        (b"\nEmail\na@b.co\n", "no_header"),
        (b",,\n1,2\n", "no_header"),
        (b' ,""\n1,2\n', "no_header"),
        (b"\xef\xbb\xbf\n1\n", "no_header"),
        (b"Email,Name", "no_rows"),
        (b"Email,Name\n", "no_rows"),
        (b"Email,Name\r\n\r\n\n\r\n", "no_rows"),
        (b"Email\x00,Name\n1,2\n", "binary_file"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary_file"),
        (b"\xff\xfeE\x00m\x00", "binary_file"),  # UTF-16: bad UTF-8, NUL bytes too
        (b"Email,Name\n\xc3\x28,x\n", "not_utf8"),
        (b"Email,Name\nann,Ren\xe9e\n", "not_utf8"),
        (b"Email,Name\na@b.co,\xe2\x82", "not_utf8"),
        (b"Email,Name\n\xed\xa0\x80\n", "not_utf8"),  # an encoded surrogate
    ],
)
def test_every_problem_has_a_stable_code_whatever_the_chunking(data: bytes, code: str) -> None:
    first = outcome([data])
    assert isinstance(first, tuple)
    assert first[0] == code
    for chunks in chunkings(data):
        assert outcome(chunks) == first, chunks


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"Email\n\xff\n", 6),
        (b"Email\n\xc3\xa9\xc3(\n", 8),
        (b"Email\na\xe2\x82", 7),  # ends mid-character
    ],
)
def test_not_utf8_says_at_which_byte(data: bytes, offset: int) -> None:
    for chunks in chunkings(data):
        assert outcome(chunks) == ("not_utf8", inspection._not_utf8(offset).message)


def test_bad_utf8_near_a_nul_byte_is_binary() -> None:
    probe = inspection._BINARY_PROBE
    for data in (
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        b"\xff\xfeE\x00m\x00a\x00i\x00l\x00",  # UTF-16
        b"Email\n\xe2\x00\n",  # a NUL where a continuation byte belongs
        b"Email\n\xff" + b"x" * (probe - 1) + b"\x00",
    ):
        for chunks in chunkings(data):
            assert outcome(chunks)[0] == "binary_file", chunks
    far = b"Email\n\xff" + b"x" * probe + b"\x00"
    for chunks in chunkings(far):
        assert outcome(chunks) == ("not_utf8", inspection._not_utf8(6).message)


def test_bad_utf8_is_refused_without_reading_to_the_end() -> None:
    inspector = CsvInspector()
    inspector.feed(b"Email\n\xff")
    inspector.feed(b"x" * (inspection._BINARY_PROBE - 1))
    with pytest.raises(ApiError) as caught:
        inspector.feed(b"x")
    assert caught.value.code == "not_utf8"


def test_a_multibyte_character_split_anywhere_is_fine() -> None:
    data = "Name,Note\nJürgen,€ and 😀\n".encode()
    for cut in range(len(data) + 1):
        assert inspect([data[:cut], data[cut:]]) == CsvSummary(("Name", "Note"), 1, len(data))


def test_the_header_may_be_1_mib_but_not_more() -> None:
    limit = inspection.MAX_HEADER_BYTES
    names = [b'"a\nb"', *(b"c%07d" % i for i in range(limit // 9 - 2))]
    joined = b",".join(names)
    header = joined + b"," + b"d" * (limit - len(joined) - 2) + b"\r"
    assert len(header) == limit  # with its quoted line break and its "\r"
    columns = inspect(split_every(header + b"\n1\n", 65536)).columns
    assert (len(columns), columns[0], columns[1]) == (len(names) + 1, "a\nb", "c0000000")
    for chunks in ([b"x" + header + b"\n1\n"], split_every(b"x" * (limit + 1), 65536)):
        code, message = outcome(chunks)
        assert code == "no_header"
        assert "longer than" in message


def test_an_overlong_header_is_refused_as_soon_as_it_passes_the_limit() -> None:
    inspector = CsvInspector(max_header_bytes=10)
    inspector.feed(b"0123456789")
    with pytest.raises(ApiError) as caught:
        inspector.feed(b"A")
    assert caught.value.code == "no_header"


def test_huge_column_counts_and_long_lines() -> None:
    header = ",".join(f"c{i}" for i in range(50_000))
    long_row = '"' + "z\n" * 400_000 + '"'
    data = f"{header}\n{'v,' * 49_999}v\n{long_row}\n{'y' * 3_000_000}\n".encode()
    for chunks in ([data], split_every(data, 65536), split_every(data, 1_000_003)):
        summary = inspect(chunks)
        assert (len(summary.columns), summary.rows, summary.size) == (50_000, 3, len(data))


def test_large_chunks_are_scanned_in_windows_with_the_same_result() -> None:
    rng = random.Random(7)
    lines = [b"Email,Note\r\n"]
    for i in range(20_000):
        note = rng.choice([b"plain", b'"quoted, with ""escapes"""', b'"multi\r\nline"', b""])
        lines.append(b"p%d@example.com,%s\r\n" % (i, note) + rng.choice([b"", b"\r\n", b"\n"]))
    data = b"".join(lines)
    expected = inspect(split_every(data, 4096))
    assert expected.rows == 20_000
    for window in (7, 1000, 65536):
        with patch.object(inspection, "_WINDOW", window):
            assert inspect([data]) == expected


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"Email\na@b.co\n\nc@d.co\n", id="lf"),
        pytest.param(b"Email\r\na@b.co\r\n\r\nc@d.co\r\n", id="crlf"),
        pytest.param(b"Email\na@b.co\n\r\r\nc@d.co\n", id="two-carriage-returns"),
        pytest.param(b"Email\na@b.co\r\rx\nc@d.co\r\r\n", id="carriage-returns-in-a-row"),
        pytest.param(b"Email\n\r\na@b.co\n\n\n\nc@d.co\n\r", id="many"),
    ],
)
def test_a_line_of_nothing_but_carriage_returns_is_blank_not_a_row(data: bytes) -> None:
    assert inspect([data]).rows == 2
    assert inspect(split_every(data, 1)).rows == 2


def test_a_bytearray_or_memoryview_is_fine() -> None:
    data = b"Email\na@b.co\n"
    assert inspect([bytearray(data)]) == inspect([memoryview(data)]) == inspect([data])


# Property: for whatever rows the csv module writes, however the bytes are chunked,
# the inspector agrees with the csv module on the header and the non-blank records.

cells = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00\ufeff"),
    max_size=6,
)
tables = st.lists(st.lists(cells, max_size=4), min_size=1, max_size=12)


@given(
    table=tables,
    terminator=st.sampled_from(["\n", "\r\n"]),
    quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
    bom=st.booleans(),
    data=st.data(),
)
def test_the_csv_module_and_the_inspector_agree(
    table: list[list[str]], terminator: str, quoting: int, bom: bool, data: st.DataObject
) -> None:
    if terminator == "\n" and quoting == csv.QUOTE_MINIMAL:
        # The csv module leaves a lone "\r" unquoted then, which it cannot read back.
        table = [[cell.replace("\r", "") for cell in row] for row in table]
    out = io.StringIO()
    csv.writer(out, lineterminator=terminator, quoting=quoting).writerows(table)
    text = out.getvalue()
    raw = ("\ufeff" if bom else "").encode() + text.encode()
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=8), label="cuts")
    records = list(csv.reader(io.StringIO(text, newline="")))
    got = outcome(split_at(raw, cuts))
    if not any(name.strip() for name in records[0]):
        assert got[0] == "no_header"
    elif not [record for record in records[1:] if record]:
        assert got[0] == "no_rows"
    else:
        rows = sum(1 for record in records[1:] if record)
        assert got == CsvSummary(tuple(records[0]), rows, len(raw))


# Property: on arbitrary bytes, whatever the chunking (and the window size), the outcome
# is that of a slow byte-by-byte model of the rules.

GOOD = [b"a", b"B", b",", b",", b'"', b'"', b"\n", b"\n", b"\r", b" ", b"\xc3\xa9", b"\xe2\x82\xac"]
BAD = [b"\x00", b"\xff", b"\xc3", b"\xe2\x82", b"\xef\xbb\xbf"]


def model(data: bytes, max_header: int, probe: int) -> tuple[str, int | None] | CsvSummary:
    """The rules, one byte at a time: (code, offset of the problem) or the summary.

    Problems are ranked by the offset at which they are certain: a NUL byte or an
    overlong header where they are; invalid UTF-8 ``probe`` bytes later, or at the end.
    """
    problems: list[tuple[int, str]] = []
    if (nul := data.find(b"\x00")) >= 0:
        problems.append((nul, "binary_file"))
    bad_utf8 = None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_utf8 = exc.start
        if exc.start + probe < len(data):
            problems.append((exc.start + probe, "not_utf8"))
    records: list[bytes] = []
    line = bytearray()
    quoted = False
    for byte in data:
        quoted ^= byte == ord('"')
        if byte == ord("\n") and not quoted:
            records.append(bytes(line))
            line.clear()
        else:
            line.append(byte)
    if line:
        records.append(bytes(line))
    header = records[0] if records else b""
    if len(header) > max_header:
        problems.append((max_header, "no_header"))
    if problems:
        _, code = min(problems, key=lambda problem: problem[0])
        return code, bad_utf8 if code == "not_utf8" else None
    if not data:
        return "empty_file", None
    if bad_utf8 is not None:
        return "not_utf8", bad_utf8
    try:
        text = header.removeprefix(b"\xef\xbb\xbf").decode().rstrip("\r")
        columns = next(csv.reader(io.StringIO(text)), [])
    except csv.Error:
        return "no_header", None
    if not any(name.strip() for name in columns):
        return "no_header", None
    rows = sum(1 for record in records if record.strip(b"\r")) - 1
    if rows < 1:
        return "no_rows", None
    return CsvSummary(tuple(columns), rows, len(data))


@settings(max_examples=300)
@given(
    tokens=st.lists(st.sampled_from(GOOD * 6 + BAD), max_size=60),
    max_header=st.integers(1, 40),
    probe=st.integers(3, 12),  # at least 3, as in inspection._BINARY_PROBE's comment
    window=st.integers(1, 9),
    data=st.data(),
)
def test_any_bytes_get_the_outcome_of_the_model_whatever_the_chunking(
    tokens: list[bytes], max_header: int, probe: int, window: int, data: st.DataObject
) -> None:
    raw = b"".join(tokens)
    expected = model(raw, max_header, probe)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=10), label="cuts")
    with patch.object(inspection, "_BINARY_PROBE", probe):
        whole = outcome([raw], max_header_bytes=max_header)
        assert outcome(split_at(raw, cuts), max_header_bytes=max_header) == whole
        with patch.object(inspection, "_WINDOW", window):
            assert outcome([raw], max_header_bytes=max_header) == whole
    if isinstance(expected, CsvSummary):
        assert whole == expected
    else:
        code, offset = expected
        assert isinstance(whole, tuple)
        assert whole[0] == code
        if offset is not None:
            assert whole[1] == inspection._not_utf8(offset).message
