"""Record counting speed: `python bench/record_counting.py [--mb 100] [--repeat 3]`.

Generates results of each format in memory (about ``--mb`` MB each) and feeds them to
their counter in 1 MiB chunks, as the results directory does; prints MB/s per shape
(median of ``--repeat`` runs) and the count, which is checked against the rows made.
Pure CPU, one core; no files, no network.
"""

from __future__ import annotations

import argparse
import statistics
import time

from service.downloads.records import Format, counter_for

CHUNK = 1 << 20
PLAIN = b"1234,Jane,Doe,jane.doe@example.com,+1 555 0100,Some Street 12,Springfield\r\n"
QUOTED = b'1234,"Doe, Jane","She said ""hi""",jane@example.com,"Line\r\nbreak",Springfield\r\n'
OBJECT = b'{"id": 1234, "first": "Jane", "last": "Doe", "email": "jane@example.com", "tags": ["a"]}'


def shapes(size: int) -> list[tuple[str, Format, bytes, int]]:
    plain, quoted, objects = size // len(PLAIN), size // len(QUOTED), size // (len(OBJECT) + 2)
    return [
        ("csv, no quotes", "csv", b"a,b,c,d,e,f,g\r\n" + PLAIN * plain, plain),
        ("csv, 3 quoted fields a row", "csv", b"a,b,c,d,e,f\r\n" + QUOTED * quoted, quoted),
        ("json array of objects", "json", b"[" + b",\n".join([OBJECT] * objects) + b"]", objects),
        ("jsonl", "jsonl", b"\n".join([OBJECT] * objects) + b"\n", objects),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for name, fmt, data, rows in shapes(args.mb * 1_000_000):
        speeds = []
        for _ in range(args.repeat):
            counter = counter_for(fmt)
            started = time.perf_counter()
            for start in range(0, len(data), CHUNK):
                counter.feed(data[start : start + CHUNK])
            count = counter.finish()
            speeds.append(len(data) / (time.perf_counter() - started) / 1e6)
            assert (count.records, count.well_formed) == (rows, True), count
        print(f"{name:28} {len(data) / 1e6:6.0f} MB  {statistics.median(speeds):6.0f} MB/s")


if __name__ == "__main__":
    main()
