#!/usr/bin/env bash
# Fast checks of the SAM stack (a few seconds; scripts/test.sh runs them before the Rust tests):
#   1. the Athena named queries in template.yaml are the sql/ files verbatim;
#   2. cfn-lint on template.yaml as written;
#   3. the SAM transform CloudFormation runs at deploy time, then cfn-lint on its output
#      (catches misspelt AWS::Serverless::* properties and values that step 2 lets through);
#   4. tests over the template: env vars and names against deploy/resources.json (Globals
#      merged in), least privilege, event source mappings, the tables' custom resource,
#      parameter groups and labels, outputs, alarms, dashboard (tools/test_template.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/venv.sh
py=.venv/bin/python

echo "-- named queries = sql/ files" >&2
$py tools/template_sql.py --check

echo "-- cfn-lint template.yaml" >&2
.venv/bin/cfn-lint template.yaml

echo "-- SAM transform + cfn-lint" >&2
$py tools/sam_lint.py

echo "-- template tests" >&2
$py -m unittest tools/test_template.py
