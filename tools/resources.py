#!/usr/bin/env python3
"""Reads deploy/resources.json, the one place that names adpipe's resources per stage and the
environment each function gets, for the local tooling and the template tests.

    python3 tools/resources.py names --stage local
    python3 tools/resources.py env joiner --stage local     # KEY=VALUE lines, e.g. for `env`

Standard library only. Parameter-backed variables get the template's default value.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "deploy" / "resources.json"

# What the local endpoint reports for the account and region unless told otherwise.
LOCAL_ACCOUNT = "123456789012"
LOCAL_REGION = "us-east-1"


def load(path: Path = CONTRACT) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def names(contract: dict[str, Any], stage: str, account: str, region: str) -> dict[str, str]:
    """Every resource's name for one stage, account and region."""
    return {
        key: spec["name"].format(stage=stage, account=account, region=region)
        for key, spec in contract["resources"].items()
    }


def parameter(contract: dict[str, Any], stage: str, source: dict[str, Any]) -> str:
    """A parameter-backed value in a stage: the stage's override, else the template default."""
    overrides = contract.get("stages", {}).get(stage, {}).get("parameter_overrides", {})
    return overrides.get(source["parameter"], source["default"])


def environment(
    contract: dict[str, Any], function: str, stage: str, account: str, region: str
) -> dict[str, str]:
    """The environment `function` gets in that stage (parameters at their stage's values)."""
    resolved = names(contract, stage, account, region)
    env = {}
    for var, source in contract["env"][function].items():
        if "resource" in source:
            env[var] = resolved[source["resource"]]
        elif "parameter" in source:
            env[var] = parameter(contract, stage, source)
        else:
            env[var] = source["value"]
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description="Print adpipe resource names or a function's environment.")
    parser.add_argument("what", choices=["names", "env"])
    parser.add_argument("function", nargs="?", help="joiner or enricher (for env)")
    parser.add_argument("--stage", default="local")
    parser.add_argument("--account", default=LOCAL_ACCOUNT)
    parser.add_argument("--region", default=LOCAL_REGION)
    args = parser.parse_args()
    contract = load()
    if args.what == "names":
        values = names(contract, args.stage, args.account, args.region)
    else:
        if args.function not in contract["env"]:
            parser.error(f"function must be one of {sorted(contract['env'])}")
        values = environment(contract, args.function, args.stage, args.account, args.region)
    for key, value in values.items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
