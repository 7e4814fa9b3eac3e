#!/usr/bin/env python3
"""Lints template.yaml as CloudFormation will see it: after the SAM transform.

cfn-lint checks AWS::Serverless::* resources against its own SAM schema, which lets misspelt
event properties and bad values through (`FunctionResponseType:`, `StartingPosition:
TRIM_HORIZN`, `Runtime: provided.al2O23` all pass it). The SAM transform is what CloudFormation
runs at deploy time; it rejects unknown event properties itself, and it turns the functions
and event source mappings into plain AWS::Lambda::* resources, whose full CloudFormation schemas
cfn-lint then checks. This runs both, offline: the transform needs a region name but no
credentials, because no role in the template names a managed policy.

    python3 tools/sam_lint.py [template]      # exit 1 and one line per problem if any
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"


class _NoManagedPolicies:
    """The transform asks for this map only to resolve managed policy names in `Policies`."""

    def load(self) -> dict[str, str]:
        return {}


def transform(template: dict[str, Any]) -> dict[str, Any]:
    """The CloudFormation template the SAM transform makes of `template` (a decoded SAM template).

    Raises samtranslator's InvalidDocumentException for what the transform itself refuses."""
    # Imported here so `--help` and the pure helpers work without the venv.
    from samtranslator.translator.transform import transform as sam_transform

    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)
    # The transform records usage metrics for the hosted service and warns when nobody
    # publishes them; nothing here publishes anything.
    logging.getLogger("samtranslator.metrics").setLevel(logging.ERROR)
    sam = copy.deepcopy(template)
    # `sam build`/`sam deploy` replace a local CodeUri with the uploaded artifact's S3 URI
    # before the transform; do the same with a stand-in so the transform accepts it.
    for name, resource in sam.get("Resources", {}).items():
        props = resource.get("Properties") or {}
        if resource.get("Type") == "AWS::Serverless::Function" and isinstance(props.get("CodeUri"), str):
            props["CodeUri"] = f"s3://adpipe-sam-lint/{name}.zip"
    pseudo = {"AWS::Region": REGION, "AWS::Partition": "aws", "AWS::AccountId": "123456789012"}
    return sam_transform(sam, pseudo, _NoManagedPolicies())


def problems(text: str) -> list[str]:
    """Every problem found in a SAM template's text: transform errors, then cfn-lint matches of
    the transformed template (informational matches are left out)."""
    import cfnlint.api
    from cfnlint.decode.decode import decode_str
    from samtranslator.model.exceptions import InvalidDocumentException

    decoded, errors = decode_str(text)
    if errors:
        return [f"decode: {e}" for e in errors]
    # Plain dicts and strings: cfn-lint's decoded nodes carry line marks the transform does not need.
    template = json.loads(json.dumps(decoded))
    try:
        cfn = transform(template)
    except InvalidDocumentException as err:
        return [f"sam transform: {cause.message}" for cause in err.causes]
    matches = cfnlint.api.lint(json.dumps(cfn), regions=[REGION])
    return [
        f"{m.rule.id} {m.message} at {'/'.join(str(p) for p in m.path)}"
        for m in matches
        if not m.rule.id.startswith("I")
    ]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "template.yaml"
    found = problems(path.read_text(encoding="utf-8"))
    for line in found:
        print(f"{path.name}: {line}")
    if not found:
        print(f"sam_lint: {path.name} transforms cleanly and its CloudFormation passes cfn-lint")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
