#!/usr/bin/env python3
"""A second Iceberg implementation (pyiceberg) committing to one of the lake's tables while adpipe
writes to it: the "foreign writer" of the concurrency integration test.

  foreign_writer.py --endpoint URL --database DB --table NAME --key-column impression_id
                    --until-file PATH [--max-seconds 120] [--seed 7] [--min-rounds 1]
                    [--max-retries 20] [--rows-per-append 3] [--new-column analyst_note]
                    [--progress-file PATH]

First sets the table's write isolation to `snapshot` (see `snapshot_isolation`). Then runs rounds
until PATH exists and at least --min-rounds rounds are complete, or until
--max-seconds have passed (checked between operations and between the attempts of one). A round
is, each operation on a freshly loaded table:

  1. append     --rows-per-append rows of the table's current schema: keys `foreign-<seed>-<n>`,
                every other column a plausible value of its type, every timestamp (so
                `impression_time` / `click_time`) "now" in UTC, so the rows land in this hour;
  2. delete     1-2 rows not written here (key not starting with `foreign-`), picked at random
                (seeded) from a scan, with pyiceberg's `delete(In(key, [...]))` (copy-on-write);
                skipped while there are none;
  3. rewrite    one partition holding >= 2 data files (and no delete files) replaced by one file
                holding exactly their rows as of the snapshot read, in the table's sort order: a
                compaction (its snapshot says `overwrite`: pyiceberg cannot write `replace`);
                skipped if no partition qualifies;
  4. add column (first round only) `--new-column`, an optional string;
  5. tag        (first round only) `audit-<seed>` on the then current snapshot.

Progress. With --progress-file, after every attempt of an operation the file is replaced (written
beside it, then renamed) by one JSON object: {"rounds": complete rounds, "attempts": attempts so far,
"last_attempt_seconds": s, "longest_recent_attempt_seconds": the longest of the last 5 attempts}.
The integration test paces its other writers by it (see its comment).

Every snapshot written here carries `foreign-writer=pyiceberg` and `foreign-writer.op=<op>` in its
summary.

Conflicts. Every commit asserts what it was based on (pyiceberg's requirements, e.g. "branch main
has changed", which the Glue catalog checks against the table it reads back from Glue, then Glue's
`UpdateTable` conditional on `VersionId`, whose `ConcurrentModificationException` pyiceberg turns
into `CommitFailedException`). A conflict that pyiceberg's own retries (below) do not resolve
comes back here, and the operation is redone from scratch (reload, re-read, re-decide) after a
jittered 50-300 ms pause, for at most --max-retries attempts in all; still conflicting after
that is an error.

pyiceberg 0.12, as installed here, also retries a conflicting snapshot commit (append, delete,
overwrite) by itself inside `Transaction.commit_transaction`: `commit.retry.num-retries` times
(the table property; default 4, backoff from 100 ms), re-basing the staged snapshot on the new
head after its own conflict validation, without re-reading anything: the files an operation
deletes stay exactly the ones it read (which must still be live), the files it adds are added.
That is how a real writer meets a busy table (Java's `RewriteFiles` and Athena's DML re-base
the same way), and what a table property of 0 (which adpipe's tables carried until 2026-12-07)
took away: every operation here uses it, as the table's properties say. The counts are taken at
the catalog's `commit_table`, which pyiceberg calls once per attempt, its own retries included:
each call is one try (the catalog reads the table from Glue, checks the requirements, writes
the metadata file and calls `UpdateTable`).

pyiceberg computes the hour / day / month / year partition of a column of rows only with the
optional `pyiceberg-core` extension, which tools/requirements.txt does not install; without it,
this script computes them with pyiceberg's own per-value transforms (see
`pure_python_time_transforms`).

Prints one JSON document on stdout (logs go to stderr), exit code 0, or 1 with "error" set:

  {"rounds": N, "stopped_by": "until_file" | "max_seconds" | "error", "elapsed_seconds": s,
   "ops": {"append": {"tried": a, "landed": b, "retries": c, "max_retries_one_op": d,
                      "skipped": e, "abandoned": f,
                      "conflicts": {"requirement": g, "glue_version": h, "validation": v,
                                    "other": i}},
           "delete": {...}, "rewrite": {...}, "add_column": {...}, "tag": {...}},
   "appended_keys": [...], "deleted_keys": [...],
   "rewrites": [{"partition": {"impression_hour": "..."}, "files": k, "rows": r, "new_files": 1,
                 "snapshot_id": id, "based_on": id}, ...],
   "tag": {"name": "audit-7", "snapshot_id": 123} | null, "new_column": "analyst_note" | null,
   "error": null | "round N op: Exception: message"}

`rounds` counts complete rounds (the keys of a last, partial one are listed all the same).
`tried` counts commit attempts sent to the catalog; `landed` operations that committed (each
once); `retries` = tried - landed over the operations that landed; `max_retries_one_op` the most
retries one landed operation needed; `skipped` operations with nothing to do; `abandoned` ones
given up at --max-seconds; `conflicts` the refused attempts by what refused them ("requirement":
pyiceberg's check against the table read back from Glue, "glue_version": Glue's `VersionId`,
"validation": pyiceberg's check of what committed meanwhile against what the operation read).
"""
import argparse
import datetime
import itertools
import json
import os
import random
import sys
import time
import traceback
import uuid
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lake_check import aws_env, glue_catalog, jsonable  # noqa: E402

OPS = ("isolation", "append", "delete", "rewrite", "add_column", "tag")
FOREIGN_PREFIX = "foreign-"
SNAPSHOT_PROPERTIES = {"foreign-writer": "pyiceberg"}


def log(msg):
    now = datetime.datetime.now().strftime("%H:%M:%S.%f")[:-3]
    print(f"{now} foreign_writer: {msg}", file=sys.stderr, flush=True)


class Skip(Exception):
    """The operation has nothing to do on the table as loaded."""


class OutOfTime(Exception):
    """--max-seconds passed while an operation was still conflicting."""


class OpStats:
    def __init__(self):
        self.tried = 0
        self.landed = 0
        self.retries = 0
        self.max_retries_one_op = 0
        self.skipped = 0
        self.abandoned = 0
        self.conflicts = {"requirement": 0, "glue_version": 0, "validation": 0, "other": 0}

    def as_json(self):
        return dict(vars(self))


def conflict_kind(exc):
    """The kind of commit conflict `exc` is, or None if it is not one."""
    from botocore.exceptions import ClientError
    from pyiceberg.exceptions import CommitFailedException, ValidationException

    def glue_conflict(e):
        return isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") == (
            "ConcurrentModificationException"
        )

    if glue_conflict(exc):
        return "glue_version"
    if isinstance(exc, ValidationException):
        return "validation"
    if isinstance(exc, CommitFailedException):
        if glue_conflict(exc.__cause__):
            return "glue_version"
        if str(exc).startswith("Requirement failed"):
            return "requirement"
        return "other"
    return None


class Writer:
    def __init__(self, args, out_of_time):
        self.args = args
        self.out_of_time = out_of_time
        self.catalog = glue_catalog(args.endpoint)
        self.identifier = f"{args.database}.{args.table}"
        self.rng = random.Random(args.seed)
        self.jitter = random.Random(args.seed + 1)
        self.stats = {op: OpStats() for op in OPS}
        self.current = None  # the OpStats of the operation under way
        self.failed_op = None  # the operation that raised an error
        self.key_counter = itertools.count(1)
        self.appended_keys = []
        self.deleted_keys = []
        self.rewrites = []
        self.tag = None
        self.new_column = None
        self.rounds = 0
        self.attempt_seconds = []  # every attempt's duration, in order
        self.count_commits()

    def count_commits(self):
        """Counts every commit attempt: each call of the catalog's `commit_table` (which
        pyiceberg's `Table._do_commit` makes, once per attempt, retries of its own included)."""
        commit_table = self.catalog.commit_table

        def counted(table, requirements, updates):
            if self.current is not None:
                self.current.tried += 1
            return commit_table(table, requirements, updates)

        self.catalog.commit_table = counted

    def load(self, overrides):
        table = self.catalog.load_table(self.identifier)
        if overrides:
            # In this process's copy of the metadata only; nothing is written to the table.
            properties = {**table.metadata.properties, **overrides}
            table.metadata = table.metadata.model_copy(update={"properties": properties})
        return table

    def run(self, name, operation, overrides=None):
        """Runs `operation(table)` on freshly loaded tables until it commits once (True), is
        skipped (False), has conflicted --max-retries times (error) or --max-seconds pass between
        two attempts (OutOfTime)."""
        stats = self.stats[name]
        self.current = stats
        tried_before = stats.tried
        try:
            for attempt in range(1, self.args.max_retries + 1):
                began = time.monotonic()
                try:
                    try:
                        operation(self.load(overrides))
                    finally:
                        self.attempted(time.monotonic() - began)
                except Skip as skip:
                    stats.skipped += 1
                    log(f"{name}: skipped ({skip})")
                    return False
                except Exception as exc:
                    kind = conflict_kind(exc)
                    if kind is None:
                        self.failed_op = name
                        raise
                    stats.conflicts[kind] += 1
                    log(f"{name}: conflict on attempt {attempt} ({kind}: {exc}); redoing")
                    if self.out_of_time():
                        stats.abandoned += 1
                        log(f"{name}: abandoned, out of time")
                        raise OutOfTime() from None
                    time.sleep(self.jitter.uniform(0.05, 0.3))
                    continue
                if stats.tried == tried_before:
                    stats.skipped += 1
                    log(f"{name}: skipped (nothing to commit)")
                    return False
                retries = stats.tried - tried_before - 1
                stats.landed += 1
                stats.retries += retries
                stats.max_retries_one_op = max(stats.max_retries_one_op, retries)
                return True
            self.failed_op = name
            raise RuntimeError(f"still conflicting after {self.args.max_retries} attempts")
        finally:
            self.current = None

    def attempted(self, seconds):
        """Records one attempt's duration and publishes the progress file (if asked for)."""
        self.attempt_seconds.append(seconds)
        path = self.args.progress_file
        if not path:
            return
        progress = {
            "rounds": self.rounds,
            "attempts": len(self.attempt_seconds),
            "last_attempt_seconds": round(seconds, 3),
            "longest_recent_attempt_seconds": round(max(self.attempt_seconds[-5:]), 3),
        }
        staged = f"{path}.{os.getpid()}.tmp"
        with open(staged, "w") as f:
            json.dump(progress, f)
        os.replace(staged, path)

    # -- the operations ------------------------------------------------------------------------

    def append(self, keys):
        def operation(table):
            df = sort_rows(table, fabricated_rows(table, self.args.key_column, keys))
            table.append(df, snapshot_properties={**SNAPSHOT_PROPERTIES, "foreign-writer.op": "append"})

        if self.run("append", operation):
            self.appended_keys.extend(keys)
            log(f"append: landed {keys}")

    def delete(self):
        from pyiceberg.expressions import In
        import pyarrow.compute as pc

        key = self.args.key_column
        chosen = []

        def operation(table):
            chosen.clear()
            if table.current_snapshot() is None:
                raise Skip("table has no snapshot")
            keys = table.scan(selected_fields=(key,)).to_arrow().column(key)
            keys = keys.filter(pc.invert(pc.fill_null(pc.starts_with(keys, FOREIGN_PREFIX), True)))
            candidates = sorted(set(keys.to_pylist()))
            if not candidates:
                raise Skip(f"no rows whose {key} does not start with {FOREIGN_PREFIX!r}")
            chosen.extend(self.rng.sample(candidates, min(len(candidates), self.rng.choice((1, 2)))))
            table.delete(
                delete_filter=In(key, chosen),
                snapshot_properties={**SNAPSHOT_PROPERTIES, "foreign-writer.op": "delete"},
            )

        if self.run("delete", operation):
            self.deleted_keys.extend(chosen)
            log(f"delete: landed {chosen}")

    def rewrite(self):
        from pyiceberg.expressions import AlwaysTrue
        from pyiceberg.io.pyarrow import ArrowScan, _dataframe_to_data_files

        done = {}

        def operation(table):
            done.clear()
            snapshot = table.current_snapshot()
            if snapshot is None:
                raise Skip("table has no snapshot")
            spec = table.spec()
            if spec.is_unpartitioned():
                raise Skip("table is not partitioned")
            groups = defaultdict(list)
            for task in table.scan(snapshot_id=snapshot.snapshot_id).plan_files():
                if task.file.spec_id == spec.spec_id:
                    groups[task.file.partition].append(task)
            candidates = [
                (partition, tasks)
                for partition, tasks in groups.items()
                if len(tasks) >= 2 and not any(task.delete_files for task in tasks)
            ]
            if not candidates:
                raise Skip("no partition holds two data files without delete files")
            candidates.sort(key=lambda c: repr(c[0]))
            partition, tasks = self.rng.choice(candidates)
            expected = sum(task.file.record_count for task in tasks)

            # Exactly the rows of those files, as of the snapshot this table object holds; the
            # commit below asserts that `main` is still at that snapshot.
            df = ArrowScan(table.metadata, table.io, table.schema(), AlwaysTrue()).to_table(tasks)
            if df.num_rows != expected:
                raise RuntimeError(f"read {df.num_rows} rows from files holding {expected}")
            df = sort_rows(table, df)
            new_files = list(
                _dataframe_to_data_files(
                    table_metadata=table.metadata,
                    df=df,
                    io=table.io,
                    write_uuid=uuid.uuid4(),
                    counter=itertools.count(0),
                )
            )
            properties = {**SNAPSHOT_PROPERTIES, "foreign-writer.op": "rewrite"}
            try:
                with table.transaction() as tx:
                    with tx.update_snapshot(snapshot_properties=properties).overwrite() as rewrite:
                        for task in tasks:
                            rewrite.delete_data_file(task.file)
                        for data_file in new_files:
                            rewrite.append_data_file(data_file)
            except Exception as exc:
                if conflict_kind(exc) is not None:  # refused, so nothing refers to the new file
                    for data_file in new_files:
                        table.io.delete(data_file.file_path)
                raise
            done.update(
                partition={
                    f.name: jsonable(v) for f, v in zip(spec.fields, partition_values(spec, partition))
                },
                files=len(tasks),
                rows=expected,
                new_files=len(new_files),
                snapshot_id=table.current_snapshot().snapshot_id,
                based_on=snapshot.snapshot_id,
            )

        if self.run("rewrite", operation):
            self.rewrites.append(dict(done))
            log(f"rewrite: landed {done}")

    def add_column(self):
        from pyiceberg.types import StringType

        name = self.args.new_column

        def operation(table):
            if has_field(table, name):
                raise RuntimeError(f"the table already has a column {name!r}")
            with table.update_schema() as update:
                update.add_column(name, StringType(), doc="written by tools/foreign_writer.py")

        if self.run("add_column", operation):
            self.new_column = name
            log(f"add_column: landed {name}")

    def create_tag(self):
        name = f"audit-{self.args.seed}"
        tagged = {}

        def operation(table):
            snapshot = table.current_snapshot()
            if snapshot is None:
                raise Skip("table has no snapshot")
            if name in table.metadata.refs:
                raise RuntimeError(f"the table already has a ref {name!r}")
            table.manage_snapshots().create_tag(snapshot.snapshot_id, name).commit()
            tagged.update(name=name, snapshot_id=snapshot.snapshot_id)

        if self.run("tag", operation):
            self.tag = dict(tagged)
            log(f"tag: landed {tagged}")

    def snapshot_isolation(self):
        """Sets the table's write isolation to `snapshot` (a table property, as an analyst would
        for a table that is compacted while it is written): a rewrite then conflicts only with
        what touches the files it replaces, as Java's RewriteFiles (Glue's compaction) does, not
        with every file appended to its partition meanwhile (pyiceberg's serializable default
        for an overwrite, which a partition being written never passes)."""

        def operation(table):
            with table.transaction() as tx:
                tx.set_properties(
                    {
                        "write.update.isolation-level": "snapshot",
                        "write.delete.isolation-level": "snapshot",
                    }
                )

        self.run("isolation", operation)

    def round(self, first):
        """One round; returns False if it stopped early because time ran out."""
        seed = self.args.seed
        keys = [f"{FOREIGN_PREFIX}{seed}-{next(self.key_counter)}" for _ in range(self.args.rows_per_append)]
        steps = [lambda: self.append(keys), self.delete, self.rewrite]
        if first:
            steps.insert(0, self.snapshot_isolation)
            steps += [self.add_column, self.create_tag]
        for step in steps:
            if self.out_of_time():
                return False
            try:
                step()
            except OutOfTime:
                return False
        return True


def pure_python_time_transforms():
    """Lets pyiceberg partition rows by year / month / day / hour without `pyiceberg-core`.

    pyiceberg 0.12 computes those transforms of a whole Arrow column (to split a write by
    partition) only through the optional Rust extension `pyiceberg_core`, which this venv does not
    have (tools/requirements.txt asks for pyiceberg[glue,pyarrow]); without it every write to an
    `hour(impression_time)` table fails with NotInstalledError. If the extension is missing, this
    computes them with pyiceberg's own per-value transform (the one its scans and tests use), value
    by value: slower, the same numbers. Writes here are a few rows, or one partition."""
    import importlib.util

    if importlib.util.find_spec("pyiceberg_core") is not None:
        return
    import pyarrow as pa
    from pyiceberg.transforms import DayTransform, HourTransform, MonthTransform, YearTransform
    from pyiceberg.types import TimestampNanoType, TimestamptzNanoType

    def pyarrow_transform(self, source):
        one = self.transform(source)
        # Nanosecond timestamps go in as integers, as pyiceberg's per-value transform takes them.
        as_ints = isinstance(source, (TimestampNanoType, TimestamptzNanoType))

        def column_transform(column):
            values = (column.cast(pa.int64()) if as_ints else column).to_pylist()
            return pa.array([one(v) for v in values], type=pa.int32())

        return column_transform

    for transform in (YearTransform, MonthTransform, DayTransform, HourTransform):
        transform.pyarrow_transform = pyarrow_transform


def has_field(table, name):
    return any(f.name == name for f in table.schema().fields)


def partition_values(spec, partition):
    """The partition's values, hours and days as timestamps / dates where the transform says so."""
    from pyiceberg.transforms import DayTransform, HourTransform

    epoch = datetime.datetime(1970, 1, 1)
    values = []
    for i, f in enumerate(spec.fields):
        v = partition[i]
        if v is not None and isinstance(f.transform, HourTransform):
            v = epoch + datetime.timedelta(hours=v)
        elif v is not None and isinstance(f.transform, DayTransform):
            v = (epoch + datetime.timedelta(days=v)).date()
        values.append(v)
    return values


def plausible(field, key_column, key, n, now):
    """A value of the field's Iceberg type for the n-th row of a batch."""
    from decimal import Decimal

    from pyiceberg import types as t

    ft = field.field_type
    if field.name == key_column:
        return key
    if isinstance(ft, t.StringType):
        return f"{field.name.removesuffix('_id')}-foreign-{n}"
    if isinstance(ft, (t.LongType, t.IntegerType)):
        return 30 + n
    if isinstance(ft, (t.DoubleType, t.FloatType)):
        return round(0.25 + 0.5 * n, 2)
    if isinstance(ft, t.BooleanType):
        return n % 2 == 0
    if isinstance(ft, t.TimestampType):
        return now
    if isinstance(ft, t.TimestamptzType):
        return now.replace(tzinfo=datetime.timezone.utc)
    if isinstance(ft, t.DateType):
        return now.date()
    if isinstance(ft, t.TimeType):
        return now.time()
    if isinstance(ft, t.DecimalType):
        return Decimal(n).scaleb(-ft.scale)
    if isinstance(ft, t.UUIDType):
        return uuid.uuid4().bytes
    if isinstance(ft, (t.BinaryType, t.FixedType)):
        return bytes(getattr(ft, "length", 4) or 4)
    if field.required:
        raise RuntimeError(f"cannot fabricate a value for required column {field.name} of type {ft}")
    return None


def fabricated_rows(table, key_column, keys):
    """A pyarrow table of the table's current schema, one row per key, every column filled."""
    import pyarrow as pa

    schema = table.schema()
    if not has_field(table, key_column):
        raise RuntimeError(f"the table has no column {key_column!r}")
    # Zone-less microseconds holding UTC, like the lake's timestamps; the same "now" for
    # impression_time / click_time and every other timestamp, so the rows land in this hour.
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    rows = [
        {f.name: plausible(f, key_column, key, n, now) for f in schema.fields} for n, key in enumerate(keys)
    ]
    return pa.Table.from_pylist(rows, schema=schema.as_arrow())


def sort_rows(table, df):
    """`df` in the table's sort order (its leading identity fields), as adpipe's compaction keeps it."""
    import pyarrow.compute as pc
    from pyiceberg.table.sorting import NullOrder, SortDirection
    from pyiceberg.transforms import IdentityTransform

    keys = []
    for f in table.sort_order().fields:
        if not isinstance(f.transform, IdentityTransform):
            break
        keys.append(
            (
                table.schema().find_column_name(f.source_id),
                "ascending" if f.direction == SortDirection.ASC else "descending",
                "at_start" if f.null_order == NullOrder.NULLS_FIRST else "at_end",
            )
        )
    if not keys or df.num_rows < 2:
        return df
    return df.take(pc.sort_indices(df, sort_keys=keys))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--key-column", required=True)
    parser.add_argument(
        "--until-file", required=True, help="stop once this file exists (and --min-rounds are done)"
    )
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--min-rounds", type=int, default=1)
    parser.add_argument(
        "--max-retries", type=int, default=20, help="attempts per operation, the first one included"
    )
    parser.add_argument("--rows-per-append", type=int, default=3)
    parser.add_argument("--new-column", default="analyst_note")
    parser.add_argument("--progress-file", help="replaced by a JSON progress record after every attempt")
    args = parser.parse_args(argv)

    aws_env(args.endpoint)
    pure_python_time_transforms()
    started = time.monotonic()
    out_of_time = lambda: time.monotonic() - started >= args.max_seconds  # noqa: E731
    writer = None
    rounds = 0
    stopped_by = "max_seconds"
    error = None
    current = "setup"
    try:
        writer = Writer(args, out_of_time)
        while not out_of_time():
            current = f"round {rounds + 1}"
            if not writer.round(first=rounds == 0):
                break
            rounds += 1
            writer.rounds = rounds
            log(f"round {rounds} done")
            if rounds >= args.min_rounds and os.path.exists(args.until_file):
                stopped_by = "until_file"
                break
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        op = writer.failed_op if writer else None
        error = f"{current}{f' {op}' if op else ''}: {type(exc).__name__}: {exc}"
        stopped_by = "error"

    report = {
        "rounds": rounds,
        "stopped_by": stopped_by,
        "elapsed_seconds": round(time.monotonic() - started, 3),
        "ops": {op: (writer.stats[op] if writer else OpStats()).as_json() for op in OPS},
        "appended_keys": writer.appended_keys if writer else [],
        "deleted_keys": writer.deleted_keys if writer else [],
        "rewrites": writer.rewrites if writer else [],
        "tag": writer.tag if writer else None,
        "new_column": writer.new_column if writer else None,
        "error": error,
    }
    print(json.dumps(report, default=jsonable))
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
