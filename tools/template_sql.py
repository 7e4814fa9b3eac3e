#!/usr/bin/env python3
"""Copies the sql/ files into template.yaml's Athena named queries.

CloudFormation cannot read files, yet the named queries must be the very SQL the tests run
against the local lake. So each query in the template names its source file on the block
scalar that holds it:

      QueryString: | # sql/ctr_per_campaign_per_minute.sql
        <the file, indented>

`python3 tools/template_sql.py` rewrites those blocks from the files. `--check` changes nothing
and exits 1 when a block differs from its file, or when a file under sql/ is not embedded
exactly once (scripts/check-template.sh runs it). Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"
SQL_DIR = ROOT / "sql"

MARKER = re.compile(r"^(?P<indent> *)QueryString: \| # (?P<file>sql/[A-Za-z0-9_.-]+\.sql)\s*$")


def block_lines(sql: str, indent: str, name: str) -> list[str]:
    """The file as the body of a `|` block scalar, or an error if YAML would not give it back."""
    if not sql.endswith("\n") or sql.endswith("\n\n"):
        # `|` keeps exactly one final line break; anything else would not round-trip.
        raise ValueError(f"{name}: must end with exactly one newline")
    lines = sql[:-1].split("\n")
    if lines[0][:1].isspace():
        # YAML takes the block's indentation from its first line.
        raise ValueError(f"{name}: the first line must not start with whitespace")
    if any("\t" in line[: len(line) - len(line.lstrip())] for line in lines):
        raise ValueError(f"{name}: indent with spaces, not tabs")
    return [(indent + line) if line.strip() else "" for line in lines]


def embed(template: str, sql_dir: Path) -> tuple[str, list[str]]:
    """The template with every marked block replaced by its file, and the files it embeds."""
    lines = template.split("\n")
    out: list[str] = []
    embedded: list[str] = []
    i = 0
    while i < len(lines):
        match = MARKER.match(lines[i])
        out.append(lines[i])
        i += 1
        if not match:
            continue
        key_indent = len(match["indent"])
        # The old body: every following line that is blank or indented deeper than the key,
        # minus trailing blank lines (those separate it from the next resource).
        end = i
        while end < len(lines) and (
            not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > key_indent
        ):
            end += 1
        while end > i and not lines[end - 1].strip():
            end -= 1
        name = match["file"]
        path = sql_dir.parent / name
        if not path.is_file():
            raise ValueError(f"template.yaml names {name}, which does not exist")
        out.extend(block_lines(path.read_text(encoding="utf-8"), " " * (key_indent + 2), name))
        embedded.append(name)
        i = end
    return "\n".join(out), embedded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report differences")
    args = parser.parse_args()
    current = TEMPLATE.read_text(encoding="utf-8")
    try:
        rendered, embedded = embed(current, SQL_DIR)
    except ValueError as err:
        print(f"template_sql: {err}", file=sys.stderr)
        return 1
    problems = []
    files = sorted(f"sql/{p.name}" for p in SQL_DIR.glob("*.sql"))
    for name in files:
        if embedded.count(name) != 1:
            problems.append(f"{name} is embedded {embedded.count(name)} times (want 1)")
    if args.check:
        if rendered != current:
            stale = [n for n in embedded if _block_of(current, n) != _block_of(rendered, n)]
            problems.append(
                "named queries differ from their files: "
                + ", ".join(stale or ["(layout)"])
                + "; run `python3 tools/template_sql.py`"
            )
    elif rendered != current:
        TEMPLATE.write_text(rendered, encoding="utf-8")
        print(f"template_sql: embedded {len(embedded)} queries into template.yaml")
    for problem in problems:
        print(f"template_sql: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _block_of(template: str, name: str) -> str:
    """The text of the block marked with `name` (for naming stale queries in messages)."""
    lines = template.split("\n")
    for i, line in enumerate(lines):
        match = MARKER.match(line)
        if match and match["file"] == name:
            indent = len(match["indent"])
            body = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                body.append(nxt)
            return "\n".join(body).rstrip()
    return ""


if __name__ == "__main__":
    sys.exit(main())
