"""pyarrow's side of `parquet-vs-pyarrow` (see BENCHMARKS.md): loads the rows the Rust bench
wrote into an in-memory pyarrow Table, then times only `pq.write_table` into a BytesIO, with
the compression, level and row-group size the Rust side used. Prints one JSON line.

    .venv/bin/python tools/bench/pyarrow_bench.py FILE.parquet --rounds 7 --level 1 --row-group-rows 100000
"""

import argparse
import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("file")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--level", type=int, required=True, help="zstd compression level")
    p.add_argument("--row-group-rows", type=int, required=True)
    a = p.parse_args()

    table = pq.read_table(a.file)
    # Decoded once, outside the timing: the write sees contiguous in-memory columns.
    table = table.combine_chunks()
    seconds = []
    size = 0
    for _ in range(a.rounds):
        sink = io.BytesIO()
        t = time.perf_counter()
        pq.write_table(
            table,
            sink,
            compression="zstd",
            compression_level=a.level,
            row_group_size=a.row_group_rows,
        )
        seconds.append(time.perf_counter() - t)
        size = sink.tell()
    print(
        json.dumps(
            {
                "rows": table.num_rows,
                "bytes": size,
                "seconds": seconds,
                "pyarrow": pa.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
