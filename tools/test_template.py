"""Tests over template.yaml: it agrees with deploy/resources.json (each function's settings
as SAM sees them, Globals merged in), grants least privilege (the grants against the calls in
the Rust code, the key policy, the optimizer role's trust), keeps what holds data when the
stack goes, never lets a lifecycle rule expire the lake, creates the lake tables through its
custom resource, groups and labels every parameter, wires the event source mappings, alarms,
dashboard and outputs as docs/DEPLOY.md says, embeds the sql/ files, and passes the SAM-level
lint (which must catch misspelt properties that plain cfn-lint lets through).

Run by scripts/check-template.sh:  .venv/bin/python -m unittest tools/test_template.py
The joiner's side of the contract (JOINER_ENV, its defaults and its EMF metric names against
deploy/resources.json) is checked in Rust, by tests/tests/deploy_contract.rs.
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
import unittest
from functools import cache
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import resources  # noqa: E402
import sam_lint  # noqa: E402
import template_sql  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"

# The property that holds each resource type's physical name.
NAME_PROPERTY = {
    "AWS::Kinesis::Stream": ("Name",),
    "AWS::DynamoDB::Table": ("TableName",),
    "AWS::S3::Bucket": ("BucketName",),
    "AWS::Glue::Database": ("DatabaseInput", "Name"),
    "AWS::Athena::WorkGroup": ("Name",),
    "AWS::SQS::Queue": ("QueueName",),
    "AWS::Serverless::Function": ("FunctionName",),
}
# The stream-triggered functions, and every function (the tables function backs the
# IcebergTables custom resource).
STREAM_FUNCTIONS = {"joiner": "JoinerFunction", "enricher": "EnricherFunction"}
FUNCTIONS = {**STREAM_FUNCTIONS, "tables": "TablesFunction"}
# The only actions an Allow statement may grant on "*": Tracing: Active needs them, and X-Ray
# has no resource-level permissions for them.
XRAY_WRITE = {"xray:PutTraceSegments", "xray:PutTelemetryRecords"}


@cache
def template() -> dict[str, Any]:
    from cfnlint.decode.decode import decode_str

    decoded, errors = decode_str(TEMPLATE.read_text(encoding="utf-8"))
    assert not errors, errors
    # Plain JSON values: intrinsic functions become {"Ref": ...}, {"Fn::Sub": ...}, ...
    return json.loads(json.dumps(decoded))


@cache
def contract() -> dict[str, Any]:
    return resources.load()


def resource(logical_id: str) -> dict[str, Any]:
    return template()["Resources"][logical_id]


def props(logical_id: str) -> dict[str, Any]:
    return resource(logical_id)["Properties"]


def sam_merge(global_value: Any, local_value: Any) -> Any:
    """One property as SAM merges Globals into a resource: maps key by key (the resource's own
    keys win), lists concatenated (globals first), anything else the resource's own value."""
    if isinstance(global_value, dict) and isinstance(local_value, dict):
        merged = dict(global_value)
        for key, value in local_value.items():
            merged[key] = sam_merge(global_value[key], value) if key in global_value else value
        return merged
    if isinstance(global_value, list) and isinstance(local_value, list):
        return global_value + local_value
    return local_value


def function_props(logical_id: str) -> dict[str, Any]:
    """A function's properties with `Globals: Function` merged in, as the SAM transform does
    (checked against the transform itself by Functions.test_globals_merge_as_the_transform_merges_them)."""
    assert resource(logical_id)["Type"] == "AWS::Serverless::Function", logical_id
    merged = dict(template().get("Globals", {}).get("Function", {}))
    for key, value in props(logical_id).items():
        merged[key] = sam_merge(merged[key], value) if key in merged else value
    return merged


def function_env(logical_id: str) -> dict[str, Any]:
    return function_props(logical_id).get("Environment", {}).get("Variables", {})


def sub_pattern(name: str) -> str:
    """A resources.json name pattern as the template's !Sub string."""
    return name.replace("{stage}", "${Stage}").replace("{account}", "${AWS::AccountId}").replace(
        "{region}", "${AWS::Region}"
    )


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def statements(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from as_list(document["Statement"])


def policy_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every policy document in the template, named by where it lives."""
    for logical_id, res in template()["Resources"].items():
        p = res.get("Properties", {})
        if res["Type"] == "AWS::IAM::Role":
            for policy in p.get("Policies", []):
                yield f"{logical_id}/{policy['PolicyName']}", policy["PolicyDocument"]
        elif res["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            yield logical_id, p["PolicyDocument"]
        elif res["Type"] in ("AWS::S3::BucketPolicy", "AWS::SQS::QueuePolicy"):
            yield logical_id, p["PolicyDocument"]
        elif res["Type"] == "AWS::KMS::Key":
            yield logical_id, p["KeyPolicy"]


def grants(role: str) -> list[tuple[set[str], list[Any]]]:
    """(actions, resources) of each Allow statement of a role's inline policies."""
    out = []
    for policy in props(role)["Policies"]:
        for st in statements(policy["PolicyDocument"]):
            if st["Effect"] == "Allow":
                out.append((set(as_list(st["Action"])), as_list(st["Resource"])))
    return out


def referenced(value: Any) -> set[str]:
    """Logical ids a resource expression refers to (Ref, GetAtt, or inside a Sub)."""
    if isinstance(value, dict):
        if "Ref" in value:
            return {value["Ref"]}
        if "Fn::GetAtt" in value:
            target = value["Fn::GetAtt"]
            return {target[0] if isinstance(target, list) else target.split(".")[0]}
        if "Fn::Sub" in value:
            text = value["Fn::Sub"] if isinstance(value["Fn::Sub"], str) else value["Fn::Sub"][0]
            return {m.split(".")[0] for m in re.findall(r"\$\{([A-Za-z0-9.]+)\}", text) if "::" not in m}
    return set()


def resources_of(role: str, service: str) -> dict[str, set[str]]:
    """action -> logical ids it is granted on, for one service's actions in a role."""
    out: dict[str, set[str]] = {}
    for actions, res in grants(role):
        for action in actions:
            if action.startswith(service + ":"):
                for r in res:
                    out.setdefault(action, set()).update(referenced(r))
    return out


def sub_strings(role: str, action: str) -> set[str]:
    """The Sub texts of the resources `action` is granted on in `role`."""
    out = set()
    for actions, res in grants(role):
        if action in actions:
            out.update(r["Fn::Sub"] for r in res if isinstance(r, dict) and "Fn::Sub" in r)
    return out


# A DynamoDB request built with the Rust SDK's fluent client: `.put_item()`, `.query()`, ...
DYNAMODB_CALL = re.compile(
    r"\.(put_item|get_item|update_item|delete_item|query|batch_write_item|batch_get_item"
    r"|transact_write_items|transact_get_items)\(\)"
)


def table_paths() -> list[str]:
    """Each lake table's location in the bucket, as the template's Sub text: the contract's
    `{lake_prefix}{database}.db/<table>` (iceberg-rust's Glue catalog default)."""
    lake = contract()["prefixes"]["lake"]
    return [
        spec["location"].format(lake_prefix=lake, database="${GlueDatabase}") for spec in contract()["tables"].values()
    ]


def list_prefixes(role: str) -> set[str]:
    """The s3:prefix values a role may list the lake bucket with (every s3:ListBucket grant
    must carry the condition)."""
    out: set[str] = set()
    for policy in props(role)["Policies"]:
        for st in statements(policy["PolicyDocument"]):
            if st["Effect"] == "Allow" and "s3:ListBucket" in as_list(st["Action"]):
                for value in as_list(st["Condition"]["StringLike"]["s3:prefix"]):
                    out.add(value["Fn::Sub"] if isinstance(value, dict) else value)
    return out


def rule_prefixes(rule: dict[str, Any]) -> list[Any]:
    """Every key prefix a lifecycle rule names, in any spelling: CloudFormation's `Prefix`, the
    S3 API's `Filter.Prefix` and `Filter.And.Prefix`. None at all means the whole bucket, as
    does an empty one."""
    found = [rule.get("Prefix")]
    filt = rule.get("Filter")
    if isinstance(filt, dict):
        found.append(filt.get("Prefix"))
        if isinstance(filt.get("And"), dict):
            found.append(filt["And"].get("Prefix"))
    given = [p for p in found if p is not None]
    return given or [""]


def expires_current_objects(rule: dict[str, Any]) -> bool:
    """Whether a rule deletes live objects. Old versions (NoncurrentVersionExpiration), delete
    markers with nothing behind them (ExpiredObjectDeleteMarker) and unfinished uploads
    (AbortIncompleteMultipartUpload) are fair game: none of them is part of a table."""
    if rule.get("ExpirationInDays") is not None or rule.get("ExpirationDate") is not None:
        return True
    expiration = rule.get("Expiration")  # the S3 API's spelling
    return isinstance(expiration, dict) and any(k in expiration for k in ("Days", "Date"))


def lifecycle_threats(tmpl: dict[str, Any], bucket: str, protected: str) -> list[str]:
    """The lifecycle rules of `bucket` that could expire objects under `protected`, by Id.

    An Iceberg table's files may only be deleted by Iceberg, which knows which ones a snapshot
    still references; a lifecycle expiry deletes them by age and breaks the table. A rule
    counts when its prefix, whatever the spelling, covers `protected` from outside (the whole
    bucket, `la`) or inside (`lake/x.db/`). Disabled rules count too (one edit from
    enabled), and so does anything that cannot be read here (an intrinsic function).
    """
    config = tmpl["Resources"][bucket].get("Properties", {}).get("LifecycleConfiguration")
    if config is None:
        return []
    rules = config.get("Rules")
    if not isinstance(rules, list):
        return ["<Rules is not a plain list>"]
    threats = []
    for i, rule in enumerate(rules):
        name = rule.get("Id", f"rule {i}") if isinstance(rule, dict) else f"rule {i}"
        if not isinstance(rule, dict) or any(k.startswith("Fn::") for k in rule):
            threats.append(f"{name} (not a plain rule)")
            continue
        if not expires_current_objects(rule):
            continue
        for prefix in rule_prefixes(rule):
            if not isinstance(prefix, str) or protected.startswith(prefix) or prefix.startswith(protected):
                threats.append(name)
                break
    return threats


class EnvironmentAndNames(unittest.TestCase):
    def test_every_function_sets_exactly_its_contract_environment(self) -> None:
        self.assertEqual(set(contract()["env"]), set(FUNCTIONS))
        for function, logical_id in FUNCTIONS.items():
            env = function_env(logical_id)
            wanted = contract()["env"][function]
            self.assertEqual(set(env), set(wanted), f"{function}: template vs deploy/resources.json")
            for var, source in wanted.items():
                value = env[var]
                with self.subTest(function=function, var=var):
                    if "resource" in source:
                        spec = contract()["resources"][source["resource"]]
                        self.assertEqual(value, {"Ref": spec["logical_id"]})
                    elif "parameter" in source:
                        self.assertEqual(value, {"Ref": source["parameter"]})
                        default = template()["Parameters"][source["parameter"]]["Default"]
                        self.assertEqual(str(default), source["default"])
                    else:
                        self.assertEqual(value, source["value"])

    def test_resource_names_follow_the_contract(self) -> None:
        for key, spec in contract()["resources"].items():
            with self.subTest(resource=key):
                res = resource(spec["logical_id"])
                self.assertEqual(res["Type"], spec["type"])
                value: Any = res["Properties"]
                for part in NAME_PROPERTY[spec["type"]]:
                    value = value[part]
                if "{" in spec["name"]:
                    self.assertEqual(value, {"Fn::Sub": sub_pattern(spec["name"])})
                else:
                    self.assertEqual(value, spec["name"])

    def test_mappings_streams_and_timeouts_follow_the_contract(self) -> None:
        # adpipe reads these from deploy/resources.json; the template must say the same.
        params = template()["Parameters"]
        c = contract()

        def check(where: str, actual: Any, source: dict[str, Any]) -> None:
            if "parameter" in source:
                self.assertEqual(actual, {"Ref": source["parameter"]}, where)
                default = params[source["parameter"]]["Default"]
                self.assertEqual(str(default), source["default"], f"{where}: default of {source['parameter']}")
            elif "resource" in source:
                logical_id = c["resources"][source["resource"]]["logical_id"]
                self.assertEqual(referenced(actual), {logical_id}, where)
            else:
                self.assertEqual(actual, source["value"], where)

        for key, spec in c["streams"].items():
            logical_id = c["resources"][key]["logical_id"]
            shards = props(logical_id)["ShardCount"]["Fn::If"][1]
            check(f"{logical_id}.ShardCount", shards, spec["shards"])
        self.assertEqual(set(c["functions"]), set(FUNCTIONS))
        for function, spec in c["functions"].items():
            logical_id = FUNCTIONS[function]
            p = function_props(logical_id)
            self.assertEqual(int(p["Timeout"]), spec["timeout_seconds"], f"{logical_id}.Timeout")
            self.assertEqual(p["CodeUri"], f"functions/{spec['binary']}")
            self.assertEqual(p["FunctionName"], {"Fn::Sub": sub_pattern(c["resources"][f"{function}_function"]["name"])})
            streams = {c["resources"][s]["logical_id"] for s in spec["sources"]}
            events = p.get("Events", {})
            self.assertEqual({referenced(e["Properties"]["Stream"]).pop() for e in events.values()}, streams)
            # A source may have a mapping of its own (the joiner's keyed stream).
            by_stream = {c["resources"][s]["logical_id"]: spec.get("source_mappings", {}).get(s, function) for s in spec["sources"]}
            for name, event in events.items():
                e = event["Properties"]
                mapping = by_stream[referenced(e["Stream"]).pop()]
                for prop, source in c["mappings"][mapping].items():
                    actual = e["DestinationConfig"]["OnFailure"]["Destination"] if prop == "OnFailure" else e.get(prop)
                    check(f"{logical_id}.{name}.{prop}", actual, source)
        for stage, spec in c["stages"].items():
            for param in spec["parameter_overrides"]:
                self.assertIn(param, params, f"stage {stage} overrides an unknown parameter")

    def test_lake_tables_are_the_enricher_s_not_the_template_s(self) -> None:
        # The tables come from the custom resource, whose function runs the enricher's own table
        # set-up (partition spec, field ids, commit.retry.num-retries = 0); an AWS::Glue::Table
        # here could set none of that, and a stack update would break it.
        types = {r["Type"] for r in template()["Resources"].values()}
        self.assertNotIn("AWS::Glue::Table", types)
        custom = [lid for lid, r in template()["Resources"].items() if r["Type"].startswith("Custom::")]
        self.assertEqual(custom, ["IcebergTables"])
        self.assertEqual(props("IcebergTables")["ServiceToken"], {"Fn::GetAtt": ["TablesFunction", "Arn"]})
        tables = set(contract()["tables"])
        for logical_id in ("EnricherFunction", "TablesFunction"):
            env = function_env(logical_id)
            self.assertEqual({env["CLICKS_TABLE"], env["IMPRESSIONS_TABLE"]}, tables, logical_id)
        outputs = {o["Value"] for o in template()["Outputs"].values() if isinstance(o["Value"], str)}
        self.assertLessEqual(tables, outputs)
        optimized = {r["Properties"]["TableName"] for r in template()["Resources"].values() if r["Type"] == "AWS::Glue::TableOptimizer"}
        self.assertEqual(optimized, tables)
        for table in tables:
            spec = contract()["tables"][table]
            self.assertEqual([c["id"] for c in spec["columns"]], list(range(1, len(spec["columns"]) + 1)))

    def test_table_optimizers_wait_for_the_tables_and_keep_enough_snapshots(self) -> None:
        params = template()["Parameters"]
        # An optimizer needs its table: it is created after the custom resource made them.
        # On by default: maintenance is what keeps a table's commit cost from growing with its
        # age (compaction merges manifests and files, retention bounds metadata.json).
        self.assertEqual(params["EnableTableOptimizers"]["Default"], "true")
        for logical_id, res in template()["Resources"].items():
            if res["Type"] == "AWS::Glue::TableOptimizer":
                self.assertEqual(res.get("DependsOn"), "IcebergTables", logical_id)
        # The enricher recognises committed batches by its commit ledger, which forgets a shard
        # after the stream retention plus the mappings' maximum record age (TablesConfig,
        # crates/core/src/config.rs): both reach both lake functions from those parameters.
        config_source = (ROOT / "crates/core/src/config.rs").read_text()
        self.assertIn("ledger_horizon_ms: env.positive(STREAM_RETENTION_HOURS", config_source)
        self.assertIn("+ env.positive(MAXIMUM_RECORD_AGE_SECONDS", config_source)
        for function in ("EnricherFunction", "TablesFunction"):
            env = props(function)["Environment"]["Variables"]
            self.assertEqual(env["STREAM_RETENTION_HOURS"], {"Ref": "StreamRetentionHours"}, function)
            self.assertEqual(env["MAXIMUM_RECORD_AGE_SECONDS"], {"Ref": "MaximumRecordAgeSeconds"}, function)
            self.assertEqual(env["SNAPSHOT_RETENTION_HOURS"], {"Ref": "SnapshotRetentionHours"}, function)
        # Glue compacts an hour's partition once it holds fewer files than an hour brings (~60).
        for logical_id, res in template()["Resources"].items():
            if res["Type"] == "AWS::Glue::TableOptimizer" and res["Properties"]["Type"] == "compaction":
                config = res["Properties"]["TableOptimizerConfiguration"]["CompactionConfiguration"]
                self.assertEqual(config["IcebergConfiguration"]["MinInputFiles"], {"Ref": "CompactionMinInputFiles"}, logical_id)
        self.assertLess(int(params["CompactionMinInputFiles"]["Default"]), 60)

    def test_bucket_lifecycle_covers_dead_letter_late_and_temporary_prefixes(self) -> None:
        prefixes = contract()["prefixes"]
        rules = props("LakeBucket")["LifecycleConfiguration"]["Rules"]
        expiring = {r.get("Prefix") for r in rules if "ExpirationInDays" in r}
        # athena-results/: what the workgroup wrote there before results had their own bucket.
        self.assertEqual({prefixes["dead_letter"], prefixes["late"], "athena-results/"}, expiring)

    def test_athena_results_have_a_bucket_of_their_own(self) -> None:
        # Whoever may write query results must not thereby be able to write under lake/.
        results = contract()["resources"]["athena_results_bucket"]["logical_id"]
        self.assertNotEqual(results, contract()["resources"]["lake_bucket"]["logical_id"])
        output = props("AthenaWorkGroup")["WorkGroupConfiguration"]["ResultConfiguration"]["OutputLocation"]
        self.assertEqual(output, {"Fn::Sub": "s3://${" + results + "}/"})
        self.assertIs(props("AthenaWorkGroup")["WorkGroupConfiguration"]["EnforceWorkGroupConfiguration"], True)
        rules = props(results)["LifecycleConfiguration"]["Rules"]
        self.assertIn(7, [r.get("ExpirationInDays") for r in rules if "Prefix" not in r])
        for role in ("JoinerRole", "EnricherRole", "TablesRole"):
            self.assertNotIn(results, set().union(*resources_of(role, "s3").values()), role)

    def test_every_bucket_is_encrypted_private_and_tls_only(self) -> None:
        tls_only: set[str] = set()
        for res in template()["Resources"].values():
            if res["Type"] != "AWS::S3::BucketPolicy":
                continue
            for st in statements(res["Properties"]["PolicyDocument"]):
                if st["Effect"] == "Deny" and st.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}:
                    tls_only |= referenced(res["Properties"]["Bucket"])
        for logical_id, res in template()["Resources"].items():
            if res["Type"] != "AWS::S3::Bucket":
                continue
            with self.subTest(bucket=logical_id):
                p = res["Properties"]
                rule = p["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
                self.assertIn(rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"], ("AES256", "aws:kms"))
                self.assertEqual(set(p["PublicAccessBlockConfiguration"].values()), {True})
                self.assertEqual(len(p["PublicAccessBlockConfiguration"]), 4)
                self.assertEqual(p["OwnershipControls"], {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]})
                self.assertIn(logical_id, tls_only)

    def test_outputs_name_the_streams_bucket_catalog_and_workgroup(self) -> None:
        outputs = template()["Outputs"]
        for logical_id in (
            "ImpressionsStream",
            "ClicksStream",
            "JoinedStream",
            "LakeBucket",
            "AthenaResultsBucket",
            "GlueDatabase",
            "AthenaWorkGroup",
        ):
            self.assertIn({"Ref": logical_id}, [o["Value"] for o in outputs.values()], logical_id)

    def test_outputs_give_every_name_and_arn_the_cli_needs(self) -> None:
        outputs = template()["Outputs"]
        wanted = {
            "ImpressionsStreamName": {"Ref": "ImpressionsStream"},
            "ClicksStreamName": {"Ref": "ClicksStream"},
            "JoinedStreamName": {"Ref": "JoinedStream"},
            "ImpressionsStreamArn": {"Fn::GetAtt": ["ImpressionsStream", "Arn"]},
            "ClicksStreamArn": {"Fn::GetAtt": ["ClicksStream", "Arn"]},
            "JoinedStreamArn": {"Fn::GetAtt": ["JoinedStream", "Arn"]},
            "Region": {"Ref": "AWS::Region"},
            "MetricsNamespace": {"Ref": "MetricsNamespace"},
            "JoinerRoleArn": {"Fn::GetAtt": ["JoinerRole", "Arn"]},
            "EnricherRoleArn": {"Fn::GetAtt": ["EnricherRole", "Arn"]},
            "StreamKeyArn": {"Fn::GetAtt": ["StreamKey", "Arn"]},
            "LakeBucketName": {"Ref": "LakeBucket"},
            "AthenaResultsBucketName": {"Ref": "AthenaResultsBucket"},
            "GlueDatabaseName": {"Ref": "GlueDatabase"},
            "EnrichedClicksTableName": "enriched_clicks",
            "ImpressionsTableName": "impressions",
            "AthenaWorkGroupName": {"Ref": "AthenaWorkGroup"},
            "StateLogTableName": {"Ref": "StateLogTable"},
            "KeyedStreamName": {"Ref": "KeyedStream"},
            "CommitLeaseTableName": {"Ref": "CommitLeaseTable"},
            "OnFailureQueueUrl": {"Ref": "OnFailureQueue"},
            "JoinerFunctionName": {"Ref": "JoinerFunction"},
            "EnricherFunctionName": {"Ref": "EnricherFunction"},
            "TablesFunctionName": {"Ref": "TablesFunction"},
            "DashboardName": {"Ref": "Dashboard"},
        }
        for key, value in wanted.items():
            with self.subTest(output=key):
                self.assertIn(key, outputs)
                self.assertEqual(outputs[key]["Value"], value)
        # The conditional audit bucket is the only output not listed above.
        self.assertEqual(set(outputs) - set(wanted), {"LakeDataEventsBucketName"})

    def test_each_resource_s_output_in_the_contract_names_it(self) -> None:
        # `adpipe --stack NAME env` finds each resource-backed variable's value through the
        # output deploy/resources.json names for the resource.
        outputs = template()["Outputs"]
        env = contract()["env"]
        needed = {s["resource"] for f in ("joiner", "enricher") for s in env[f].values() if "resource" in s}
        for key, spec in contract()["resources"].items():
            with self.subTest(resource=key):
                if key in needed:
                    self.assertIn("output", spec, f"{key} backs a variable but names no output")
                if "output" in spec:
                    self.assertEqual(outputs[spec["output"]]["Value"], {"Ref": spec["logical_id"]})

    def test_every_output_the_cli_reads_exists(self) -> None:
        # `adpipe --stack` reads the outputs named by the *_OUTPUT constants of
        # tools/local/src/stack.rs (and the role ARNs by name in main.rs).
        source = (ROOT / "tools/local/src/stack.rs").read_text()
        keys = re.findall(r'pub const [A-Z_]+_OUTPUT: &str = "([A-Za-z]+)";', source)
        self.assertGreaterEqual(len(keys), 15)
        outputs = template()["Outputs"]
        for key in keys + ["JoinerRoleArn", "EnricherRoleArn", "Region"]:
            with self.subTest(output=key):
                self.assertIn(key, outputs)
                self.assertNotIn("Condition", outputs[key])
        for key, output in outputs.items():
            self.assertTrue(output.get("Description"), f"{key} has no Description")
        # The table outputs name the contract's tables and say where the tables come from.
        self.assertEqual(
            {outputs["EnrichedClicksTableName"]["Value"], outputs["ImpressionsTableName"]["Value"]}, set(contract()["tables"])
        )
        for key in ("EnrichedClicksTableName", "ImpressionsTableName"):
            self.assertIn("IcebergTables", outputs[key]["Description"], key)
            self.assertNotIn("first start", outputs[key]["Description"], key)


class TablesCustomResource(unittest.TestCase):
    """The Iceberg tables exist when the deploy ends: custom resource IcebergTables, backed by
    the tables function, as deploy/resources.json (custom_resources) describes it."""

    def spec(self) -> dict[str, Any]:
        return contract()["custom_resources"]["iceberg_tables"]

    def test_properties_follow_the_contract(self) -> None:
        spec = self.spec()
        res = resource(spec["logical_id"])
        self.assertEqual(res["Type"], spec["type"])
        p = res["Properties"]
        token = contract()["resources"][spec["service_token"]]["logical_id"]
        self.assertEqual(p["ServiceToken"], {"Fn::GetAtt": [token, "Arn"]})
        self.assertEqual(set(p), {"ServiceToken", "ServiceTimeout"} | set(spec["properties"]))
        for prop, source in spec["properties"].items():
            with self.subTest(prop=prop):
                if "resource" in source:
                    self.assertEqual(p[prop], {"Ref": contract()["resources"][source["resource"]]["logical_id"]})
                elif "format" in source:
                    keys = re.findall(r"\{([a-z_]+)\}", source["format"])
                    sub = source["format"].format(**{k: "${" + contract()["resources"][k]["logical_id"] + "}" for k in keys})
                    self.assertEqual(p[prop], {"Fn::Sub": sub})
                else:
                    self.assertEqual(p[prop], source["value"])
        # A string, so that "1" and "1.0" are different versions and CloudFormation compares
        # what the tables crate defines.
        self.assertIsInstance(p["SchemaVersion"], str)

    def test_database_and_warehouse_are_the_enricher_s(self) -> None:
        p = props("IcebergTables")
        env = function_env("EnricherFunction")
        self.assertEqual(p["Database"], env["GLUE_DATABASE"])
        bucket = env["LAKE_BUCKET"]["Ref"]
        self.assertEqual(p["Warehouse"], {"Fn::Sub": "s3://${" + bucket + "}/" + env["LAKE_PREFIX"].strip("/")})

    def test_tables_function_env_uses_the_enricher_s_names_and_values(self) -> None:
        env = contract()["env"]
        for var, source in env["tables"].items():
            self.assertEqual(source, env["enricher"].get(var), var)

    def test_the_service_timeout_outlasts_the_function(self) -> None:
        timeout = int(props("IcebergTables")["ServiceTimeout"])
        self.assertGreater(timeout, int(function_props("TablesFunction")["Timeout"]))
        self.assertLessEqual(timeout, 3600)

    def test_tables_exist_before_the_enricher_optimizers_and_queries(self) -> None:
        self.assertEqual(resource("EnricherFunction").get("DependsOn"), "IcebergTables")
        for logical_id, res in template()["Resources"].items():
            if res["Type"] in ("AWS::Athena::NamedQuery", "AWS::Glue::TableOptimizer"):
                self.assertEqual(res.get("DependsOn"), "IcebergTables", logical_id)

    def test_no_code_path_can_drop_the_tables(self) -> None:
        # Retained: CloudFormation sends no Delete on stack deletion, nor for the old resource
        # after a replacement (a change of Database).
        self.assertTrue(retained(resource("IcebergTables")))


class LakeLifecycle(unittest.TestCase):
    """No lifecycle rule may expire the Iceberg tables' files (lifecycle_threats)."""

    def lake(self) -> tuple[str, str]:
        return contract()["resources"]["lake_bucket"]["logical_id"], contract()["prefixes"]["lake"]

    def with_rule(self, rule: dict[str, Any]) -> dict[str, Any]:
        """The real template with one more rule on the lake bucket."""
        tmpl = json.loads(json.dumps(template()))
        bucket, _ = self.lake()
        tmpl["Resources"][bucket]["Properties"]["LifecycleConfiguration"]["Rules"].append(rule)
        return tmpl

    def test_the_template_expires_nothing_under_the_lake_prefix(self) -> None:
        bucket, lake = self.lake()
        self.assertEqual(lifecycle_threats(template(), bucket, lake), [])

    def test_catches_a_whole_bucket_expiry(self) -> None:
        bucket, lake = self.lake()
        for rule in (
            {"Id": "no-prefix", "Status": "Enabled", "ExpirationInDays": 365},
            {"Id": "empty-prefix", "Status": "Enabled", "Prefix": "", "ExpirationInDays": 365},
            {"Id": "api-spelling", "Status": "Enabled", "Expiration": {"Days": 365}},
            {"Id": "by-date", "Status": "Enabled", "ExpirationDate": "2030-01-01T00:00:00Z"},
            {"Id": "disabled", "Status": "Disabled", "ExpirationInDays": 365},
        ):
            with self.subTest(rule=rule["Id"]):
                self.assertEqual(lifecycle_threats(self.with_rule(rule), bucket, lake), [rule["Id"]])

    def test_catches_a_filter_prefix(self) -> None:
        bucket, lake = self.lake()
        for rule in (
            {"Id": "filter-prefix", "Status": "Enabled", "Filter": {"Prefix": "lake/"}, "ExpirationInDays": 30},
            {"Id": "filter-empty", "Status": "Enabled", "Filter": {}, "ExpirationInDays": 30},
            {
                "Id": "filter-and-prefix",
                "Status": "Enabled",
                "Filter": {"And": {"Prefix": "lake/", "Tags": [{"Key": "k", "Value": "v"}]}},
                "ExpirationInDays": 30,
            },
        ):
            with self.subTest(rule=rule["Id"]):
                self.assertEqual(lifecycle_threats(self.with_rule(rule), bucket, lake), [rule["Id"]])

    def test_catches_a_prefix_that_covers_the_lake_from_outside_or_inside(self) -> None:
        bucket, lake = self.lake()
        for prefix in ("la", "l", "lake", "lake/", "lake/adpipe_dev.db/enriched_clicks/metadata/"):
            rule = {"Id": f"prefix-{prefix}", "Status": "Enabled", "Prefix": prefix, "ExpirationInDays": 30}
            with self.subTest(prefix=prefix):
                self.assertEqual(lifecycle_threats(self.with_rule(rule), bucket, lake), [rule["Id"]])

    def test_catches_what_it_cannot_read(self) -> None:
        bucket, lake = self.lake()
        rule = {"Id": "from-a-parameter", "Status": "Enabled", "Prefix": {"Ref": "SomePrefix"}, "ExpirationInDays": 30}
        self.assertEqual(lifecycle_threats(self.with_rule(rule), bucket, lake), ["from-a-parameter"])
        conditional = {"Fn::If": ["Cond", {"Id": "x", "ExpirationInDays": 1}, {"Ref": "AWS::NoValue"}]}
        self.assertEqual(len(lifecycle_threats(self.with_rule(conditional), bucket, lake)), 1)

    def test_lets_through_what_leaves_the_tables_alone(self) -> None:
        bucket, lake = self.lake()
        for rule in (
            {"Id": "other-prefix", "Status": "Enabled", "Prefix": "lakehouse/", "ExpirationInDays": 1},
            {"Id": "sibling", "Status": "Enabled", "Filter": {"Prefix": "dead-letter/"}, "ExpirationInDays": 1},
            {"Id": "old-versions", "Status": "Enabled", "NoncurrentVersionExpiration": {"NoncurrentDays": 1}},
            {"Id": "markers", "Status": "Enabled", "ExpiredObjectDeleteMarker": True},
            {"Id": "uploads", "Status": "Enabled", "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
        ):
            with self.subTest(rule=rule["Id"]):
                self.assertEqual(lifecycle_threats(self.with_rule(rule), bucket, lake), [])

    def test_old_versions_are_kept_long_enough_to_undo_a_mistake(self) -> None:
        rules = props("LakeBucket")["LifecycleConfiguration"]["Rules"]
        noncurrent = [r["NoncurrentVersionExpiration"]["NoncurrentDays"] for r in rules if "NoncurrentVersionExpiration" in r]
        self.assertEqual(noncurrent, [{"Ref": "LakeNoncurrentVersionDays"}])
        param = template()["Parameters"]["LakeNoncurrentVersionDays"]
        self.assertGreaterEqual(int(param["Default"]), 30)
        self.assertGreaterEqual(int(param["MinValue"]), 7)
        self.assertEqual(props("LakeBucket")["VersioningConfiguration"], {"Status": "Enabled"})


class LakeAudit(unittest.TestCase):
    """CloudTrail data events on the lake bucket: off by default, one parameter away."""

    TRAIL_RESOURCES = ("LakeTrailBucket", "LakeTrailBucketPolicy", "LakeDataEventsTrail")

    def test_off_by_default_and_entirely_behind_the_switch(self) -> None:
        param = template()["Parameters"]["LakeDataEvents"]
        self.assertEqual(param["Default"], "none")
        self.assertEqual(set(param["AllowedValues"]), {"none", "writes", "all"})
        self.assertEqual(template()["Conditions"]["LakeDataEventsOn"], {"Fn::Not": [{"Fn::Equals": [{"Ref": "LakeDataEvents"}, "none"]}]})
        for logical_id, res in template()["Resources"].items():
            if res["Type"] == "AWS::CloudTrail::Trail" or logical_id in self.TRAIL_RESOURCES:
                self.assertEqual(res.get("Condition"), "LakeDataEventsOn", logical_id)

    def test_trail_records_object_calls_on_the_lake_bucket_only(self) -> None:
        trail = props("LakeDataEventsTrail")
        self.assertEqual(trail["S3BucketName"], {"Ref": "LakeTrailBucket"})
        self.assertIs(trail["EnableLogFileValidation"], True)
        self.assertIs(trail["IsLogging"], True)
        (selector,) = trail["AdvancedEventSelectors"]
        fields = {f["Field"]: f for f in selector["FieldSelectors"] if "Field" in f}
        self.assertEqual(fields["eventCategory"]["Equals"], ["Data"])
        self.assertEqual(fields["resources.type"]["Equals"], ["AWS::S3::Object"])
        self.assertEqual(fields["resources.ARN"]["StartsWith"], [{"Fn::Sub": "${LakeBucket.Arn}/"}])
        # "writes" adds readOnly = false; "all" leaves it out.
        (conditional,) = [f for f in selector["FieldSelectors"] if "Fn::If" in f]
        self.assertEqual(
            conditional["Fn::If"],
            ["LakeDataEventsWritesOnly", {"Field": "readOnly", "Equals": ["false"]}, {"Ref": "AWS::NoValue"}],
        )

    def test_cloudtrail_may_write_only_for_this_trail(self) -> None:
        trail_arn = "arn:${AWS::Partition}:cloudtrail:${AWS::Region}:${AWS::AccountId}:trail/adpipe-${Stage}-lake-data-events"
        self.assertEqual(props("LakeDataEventsTrail")["TrailName"], {"Fn::Sub": "adpipe-${Stage}-lake-data-events"})
        allows = [st for st in statements(props("LakeTrailBucketPolicy")["PolicyDocument"]) if st["Effect"] == "Allow"]
        self.assertEqual(len(allows), 2)
        for st in allows:
            self.assertEqual(st["Principal"], {"Service": "cloudtrail.amazonaws.com"})
            self.assertEqual(st["Condition"]["StringEquals"]["aws:SourceArn"], {"Fn::Sub": trail_arn})


# Types whose resources hold data, or the pointers to it, that a stack deletion or replacement
# must not take along. A key is on the list because what it encrypts is unreadable without it.
DATA_TYPES = {
    "AWS::Kinesis::Stream",
    "AWS::SQS::Queue",
    "AWS::DynamoDB::Table",
    "AWS::S3::Bucket",
    "AWS::Glue::Database",
    "AWS::KMS::Key",
}
# Data-typed resources that hold nothing worth keeping, and why.
DISPOSABLE = {
    "CommitLeaseTable": "a lease lives a minute; what each commit covers is in the Iceberg snapshots",
}


def policy(value: Any, keep_data: bool) -> Any:
    """A DeletionPolicy, UpdateReplacePolicy or property value with `!If [KeepData, a, b]`
    resolved as a stack with RetainData true (`keep_data`) or false sees it."""
    if isinstance(value, dict) and list(value) == ["Fn::If"]:
        condition, then, otherwise = value["Fn::If"]
        assert condition == "KeepData", f"only KeepData decides what a deletion keeps: {value}"
        return then if keep_data else otherwise
    return value


def retained(res: dict[str, Any], keep_data: bool = True) -> bool:
    """Kept on stack deletion and on replacement, with RetainData as `keep_data` (the default,
    true, is what production runs)."""
    return all(policy(res.get(k), keep_data) == "Retain" for k in ("DeletionPolicy", "UpdateReplacePolicy"))


class Retention(unittest.TestCase):
    def test_every_resource_holding_data_survives_stack_deletion_and_replacement(self) -> None:
        for logical_id, res in template()["Resources"].items():
            if res["Type"] not in DATA_TYPES:
                continue
            with self.subTest(resource=logical_id):
                if logical_id in DISPOSABLE:
                    self.assertFalse(retained(res), f"{logical_id} is listed as disposable")
                else:
                    self.assertTrue(retained(res), "DeletionPolicy and UpdateReplacePolicy must be Retain")

    def test_the_lake_and_its_pointers_are_among_them(self) -> None:
        # Named, so that retyping one of them cannot drop it from the check above unnoticed.
        for logical_id in (
            "LakeBucket",
            "GlueDatabase",
            "StateLogTable",
            "ImpressionsStream",
            "ClicksStream",
            "JoinedStream",
            "OnFailureQueue",
            "StreamKey",
        ):
            self.assertTrue(retained(resource(logical_id)), logical_id)

    def test_keys_of_retained_resources_are_retained(self) -> None:
        def keys(value: Any) -> set[str]:
            if isinstance(value, dict):
                found = set()
                for k, v in value.items():
                    if k in ("KeyId", "KmsMasterKeyId", "KMSMasterKeyID", "KmsKeyId"):
                        found |= {r for r in referenced(v) if resource(r)["Type"] == "AWS::KMS::Key"}
                    else:
                        found |= keys(v)
                return found
            if isinstance(value, list):
                return set().union(*(keys(v) for v in value)) if value else set()
            return set()

        for logical_id, res in template()["Resources"].items():
            if retained(res):
                for key in keys(res.get("Properties", {})):
                    self.assertTrue(retained(resource(key)), f"{logical_id} is encrypted with {key}")

    def test_the_join_state_is_protected_from_deletion(self) -> None:
        protection = props("StateLogTable")["DeletionProtectionEnabled"]
        self.assertIs(policy(protection, True), True)
        for keep in (True, False):
            for logical_id, res in template()["Resources"].items():
                if res["Type"] == "AWS::DynamoDB::Table" and policy(res["Properties"].get("DeletionProtectionEnabled"), keep):
                    # Otherwise deleting the stack fails on the table instead of leaving it behind.
                    self.assertTrue(retained(res, keep), logical_id)

    def test_retain_data_is_a_switch_that_defaults_to_keeping(self) -> None:
        parameter = template()["Parameters"]["RetainData"]
        self.assertEqual((parameter["Default"], parameter["AllowedValues"]), ("true", ["true", "false"]))
        self.assertEqual(template()["Conditions"]["KeepData"], {"Fn::Equals": [{"Ref": "RetainData"}, "true"]})
        self.assertIn("AWS::LanguageExtensions", template()["Transform"])

    def test_a_stage_that_does_not_keep_its_data_deletes_cleanly(self) -> None:
        # RetainData=false: nothing is retained (the same stage can be deployed again, as no
        # fixed name is left behind) and nothing is protected from deletion (which would make
        # the stack's deletion fail).
        for logical_id, res in template()["Resources"].items():
            with self.subTest(resource=logical_id):
                for key in ("DeletionPolicy", "UpdateReplacePolicy"):
                    self.assertIn(policy(res.get(key), False), (None, "Delete"), key)
                protection = res.get("Properties", {}).get("DeletionProtectionEnabled")
                self.assertIn(policy(protection, False), (None, False))

    def test_the_dev_stage_is_disposable_and_prod_keeps_its_data(self) -> None:
        text = (ROOT / "samconfig.toml").read_text()
        overrides = dict(re.findall(r'^\[(\w+)\.deploy\.parameters\][^\[]*?parameter_overrides = "([^\n]*)"$', text, re.M | re.S))
        self.assertIn('RetainData=\\"false\\"', overrides["default"])
        self.assertNotIn("RetainData", overrides["prod"], "prod keeps the template's default, true")

    def test_the_dashboard_name_carries_the_region(self) -> None:
        # Dashboards are account-wide: two regions' stacks of one stage would share a name.
        self.assertEqual(props("Dashboard")["DashboardName"], {"Fn::Sub": "adpipe-${Stage}-${AWS::Region}"})


class Functions(unittest.TestCase):
    def test_functions_are_arm64_al2023_rust_builds(self) -> None:
        functions = {lid for lid, r in template()["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}
        self.assertEqual(functions, set(FUNCTIONS.values()))
        for function, logical_id in FUNCTIONS.items():
            with self.subTest(function=function):
                res = resource(logical_id)
                self.assertEqual(res["Metadata"], {"BuildMethod": "rust-cargolambda", "BuildProperties": {"Binary": function}})
                p = function_props(logical_id)
                self.assertEqual(p["Runtime"], "provided.al2023")
                self.assertEqual(p["Architectures"], ["arm64"])
                self.assertEqual(p["Handler"], "bootstrap")
                self.assertEqual(p["Tracing"], "Active")
                self.assertEqual(p["CodeUri"], f"functions/{function}")
                self.assertNotIn("Policies", p, "hand-written roles only, no SAM policy templates")
                self.assertEqual(p["Role"], {"Fn::GetAtt": [f"{function.capitalize()}Role", "Arn"]})
                self.assertEqual(
                    p["LoggingConfig"],
                    {
                        "LogFormat": "JSON",
                        "ApplicationLogLevel": {"Ref": "LogLevel"},
                        "SystemLogLevel": "WARN",
                        "LogGroup": {"Ref": f"{function.capitalize()}LogGroup"},
                    },
                )
                log_group = props(f"{function.capitalize()}LogGroup")["LogGroupName"]
                self.assertEqual(log_group, {"Fn::Sub": f"/aws/lambda/adpipe-${{Stage}}-{function}"})

    def test_what_the_functions_share_is_set_once_in_globals(self) -> None:
        shared = template()["Globals"]["Function"]
        self.assertEqual(
            {k: shared[k] for k in ("Runtime", "Architectures", "Handler", "Tracing")},
            {"Runtime": "provided.al2023", "Architectures": ["arm64"], "Handler": "bootstrap", "Tracing": "Active"},
        )
        for logical_id in FUNCTIONS.values():
            own = props(logical_id)
            for key in ("Runtime", "Architectures", "Handler", "Tracing"):
                self.assertNotIn(key, own, f"{logical_id} repeats {key} of Globals")
            self.assertEqual(set(own["LoggingConfig"]), {"LogGroup"}, logical_id)
        # A global variable reaches every function, and no function can drop it: only what
        # every function's contract sets, from the same source, may be global.
        env = contract()["env"]
        for var, value in shared.get("Environment", {}).get("Variables", {}).items():
            for function in FUNCTIONS:
                self.assertIn(var, env[function], f"global {var} is not read by {function}")

    def test_globals_merge_as_the_transform_merges_them(self) -> None:
        # function_props (what every other test reads) against the SAM transform's output.
        cfn = sam_lint.transform(json.loads(json.dumps(template())))["Resources"]
        for logical_id in FUNCTIONS.values():
            mine = function_props(logical_id)
            theirs = cfn[logical_id]["Properties"]
            with self.subTest(function=logical_id):
                for key in ("Runtime", "Architectures", "Handler", "Timeout", "MemorySize", "LoggingConfig", "Environment"):
                    self.assertEqual(theirs.get(key), mine.get(key), key)
                self.assertEqual(theirs["TracingConfig"], {"Mode": mine["Tracing"]})

    def test_event_source_mappings_are_bounded_partial_batch_mappings_with_a_destination(self) -> None:
        streams = {"JoinerFunction": {"ImpressionsStream", "ClicksStream", "KeyedStream"}, "EnricherFunction": {"JoinedStream"}}
        params = template()["Parameters"]
        for logical_id, wanted_streams in streams.items():
            events = props(logical_id)["Events"]
            self.assertEqual({referenced(e["Properties"]["Stream"]).pop() for e in events.values()}, wanted_streams)
            for name, event in events.items():
                with self.subTest(function=logical_id, event=name):
                    self.assertEqual(event["Type"], "Kinesis")
                    e = event["Properties"]
                    self.assertEqual(e["FunctionResponseTypes"], ["ReportBatchItemFailures"])
                    self.assertIs(e["BisectBatchOnFunctionError"], True)
                    self.assertIn(e["StartingPosition"], ("TRIM_HORIZON", "LATEST"))
                    self.assertIn("ParallelizationFactor", e)
                    self.assertEqual(e["DestinationConfig"]["OnFailure"]["Type"], "SQS")
                    self.assertEqual(referenced(e["DestinationConfig"]["OnFailure"]["Destination"]), {"OnFailureQueue"})
                    for key in ("MaximumRetryAttempts", "MaximumRecordAgeInSeconds"):
                        # Bounded: a parameter with a finite range, never Lambda's default of -1.
                        param = params[e[key]["Ref"]]
                        self.assertGreaterEqual(int(param["MinValue"]), 0)
                        self.assertIn("MaxValue", param)

    def test_the_deduplication_horizon_covers_retention_clock_lead_and_record_age(self) -> None:
        # A redelivery Lambda may still make (up to MaximumRecordAgeSeconds after the record's
        # arrival) of an event whose partner waited the whole retention, with the event time
        # the allowed lead ahead of its arrival, must still be recognised: the defaults tie them,
        # and the joiner refuses a horizon below retention plus lead at start-up (config.rs).
        p = template()["Parameters"]
        horizon_s = int(p["DedupHorizonHours"]["Default"]) * 3600
        needed = sum(int(p[k]["Default"]) for k in ("StateRetentionSeconds", "MaxEventTimeAheadSeconds", "MaximumRecordAgeSeconds"))
        self.assertGreaterEqual(horizon_s, needed)
        self.assertGreaterEqual(int(p["DedupHorizonHours"]["MinValue"]) * 3600, int(p["StateRetentionSeconds"]["Default"]) + int(p["MaxEventTimeAheadSeconds"]["Default"]))
        self.assertEqual(contract()["env"]["joiner"]["DEDUP_HORIZON_HOURS"], {"parameter": "DedupHorizonHours", "default": p["DedupHorizonHours"]["Default"] and str(p["DedupHorizonHours"]["Default"])})

    def test_the_warm_window_serves_every_on_time_event_from_memory(self) -> None:
        # An on-time event's partners and repeats arrived at most the clock lead plus the join
        # window before it; a warm window longer than that needs no cold page for them, and the
        # joiner refuses a shorter one at start-up (config.rs). It is also within the horizon.
        p = template()["Parameters"]
        warm = int(p["WarmWindowSeconds"]["Default"])
        reach = int(p["MaxEventTimeAheadSeconds"]["Default"]) + int(p["JoinWindowMs"]["Default"]) // 1000
        self.assertGreater(warm, reach)
        self.assertLess(warm, int(p["DedupHorizonHours"]["Default"]) * 3600)
        self.assertEqual(contract()["env"]["joiner"]["WARM_WINDOW_SECONDS"], {"parameter": "WarmWindowSeconds", "default": str(p["WarmWindowSeconds"]["Default"])})

    def test_the_keyed_stream_has_no_more_shards_than_state_buckets(self) -> None:
        # Each state bucket lives on exactly one keyed shard (crates/core/src/join/buckets.rs); a shard
        # beyond the bucket count would own none and the joiner would refuse its batches.
        source = (ROOT / "crates/core/src/join/buckets.rs").read_text()
        bits = int(re.search(r"pub const BUCKET_BITS: u32 = (\d+);", source).group(1))
        self.assertEqual(int(template()["Parameters"]["KeyedShardCount"]["MaxValue"]), 2**bits)
        # One writer per shard: a second concurrent batch of a shard would race the first.
        keyed = function_props("JoinerFunction")["Events"]["Keyed"]["Properties"]
        self.assertEqual(keyed["ParallelizationFactor"], 1)

    def test_log_level_cannot_filter_out_the_emf_metric_lines(self) -> None:
        # EMF lines carry no level, so Lambda files them as INFO.
        self.assertLessEqual(set(template()["Parameters"]["LogLevel"]["AllowedValues"]), {"TRACE", "DEBUG", "INFO"})


class LeastPrivilege(unittest.TestCase):
    def test_no_wildcard_action_or_resource_is_allowed(self) -> None:
        for where, document in policy_documents():
            for st in statements(document):
                if st["Effect"] != "Allow":
                    continue  # a wildcard in a Deny only narrows access
                if where == "StreamKey":
                    # In a key policy "*" can only mean this key, and the account root statement
                    # is what lets IAM policies grant the key at all; wildcard administration
                    # actions are checked against every use action in KeyPolicy below.
                    self.assertEqual(st["Principal"], {"AWS": {"Fn::Sub": ACCOUNT_ROOT}})
                    continue
                with self.subTest(policy=where, sid=st.get("Sid")):
                    for action in as_list(st["Action"]):
                        self.assertNotIn("*", action)
                    for res in as_list(st["Resource"]):
                        if res == "*" and set(as_list(st["Action"])) <= XRAY_WRITE:
                            continue  # the documented exception: X-Ray writes name no resource
                        self.assertNotEqual(res, "*")
                        text = res if isinstance(res, str) else res.get("Fn::Sub", "")
                        if isinstance(text, str) and text.startswith("arn:"):
                            # arn:partition:service:region:account:resource, resource not a bare *
                            self.assertFalse(text.split(":", 5)[5].startswith("*"), text)

    def test_every_function_role_may_write_traces_and_nothing_else_on_any_resource(self) -> None:
        for function in FUNCTIONS:
            role = f"{function.capitalize()}Role"
            anywhere = [actions for actions, res in grants(role) if "*" in res]
            self.assertEqual(anywhere, [XRAY_WRITE], role)
        for logical_id, res in template()["Resources"].items():
            if res["Type"] == "AWS::IAM::Role" and logical_id not in {f"{f.capitalize()}Role" for f in FUNCTIONS}:
                self.assertNotIn("xray", {a.split(":")[0] for actions, _ in grants(logical_id) for a in actions}, logical_id)

    def test_joiner_only_updates_join_state_and_writes_its_own_prefixes(self) -> None:
        self.assertEqual(
            resources_of("JoinerRole", "dynamodb"),
            {
                "dynamodb:UpdateItem": {"StateLogTable"},
                "dynamodb:PutItem": {"StateLogTable"},
                "dynamodb:Query": {"StateLogTable"},
                "dynamodb:GetItem": {"StateLogTable"},
            },
        )
        self.assertEqual(resources_of("JoinerRole", "kinesis")["kinesis:PutRecords"], {"JoinedStream", "KeyedStream"})
        self.assertEqual(set(resources_of("JoinerRole", "s3")), {"s3:PutObject"})
        self.assertEqual(
            sub_strings("JoinerRole", "s3:PutObject"),
            {"${LakeBucket.Arn}/dead-letter/joiner/*", "${LakeBucket.Arn}/late/joiner/*"},
        )
        self.assertEqual(resources_of("JoinerRole", "glue"), {})
        self.assertEqual(resources_of("JoinerRole", "sqs"), {"sqs:SendMessage": {"OnFailureQueue"}})

    def test_enricher_touches_only_its_tables_and_the_lease(self) -> None:
        self.assertEqual(
            resources_of("EnricherRole", "dynamodb"),
            {a: {"CommitLeaseTable"} for a in ("dynamodb:PutItem", "dynamodb:DeleteItem")},
        )
        glue = resources_of("EnricherRole", "glue")
        self.assertEqual(set(glue), {"glue:GetDatabase", "glue:CreateTable", "glue:GetTable", "glue:UpdateTable"})
        catalog = "arn:${AWS::Partition}:glue:${AWS::Region}:${AWS::AccountId}:"
        on_tables = {catalog + "catalog", catalog + "database/${GlueDatabase}"} | {
            catalog + "table/${GlueDatabase}/" + table for table in contract()["tables"]
        }
        for action in ("glue:CreateTable", "glue:GetTable", "glue:UpdateTable"):
            self.assertEqual(sub_strings("EnricherRole", action), on_tables, action)
        self.assertEqual(sub_strings("TableOptimizerRole", "glue:UpdateTable"), on_tables)
        self.assertEqual(set(resources_of("EnricherRole", "s3")), {"s3:GetObject", "s3:PutObject", "s3:ListBucket"})
        objects = {"${LakeBucket.Arn}/" + path + "/*" for path in table_paths()}
        self.assertEqual(sub_strings("EnricherRole", "s3:GetObject"), objects)
        self.assertEqual(sub_strings("EnricherRole", "s3:PutObject"), objects | {"${LakeBucket.Arn}/dead-letter/enricher/*"})
        self.assertEqual(list_prefixes("EnricherRole"), {path + "/*" for path in table_paths()})
        self.assertNotIn("kinesis:PutRecords", resources_of("EnricherRole", "kinesis"))

    def test_tables_function_touches_only_the_two_tables_and_the_lease(self) -> None:
        catalog = "arn:${AWS::Partition}:glue:${AWS::Region}:${AWS::AccountId}:"
        on_tables = {catalog + "catalog", catalog + "database/${GlueDatabase}"} | {
            catalog + "table/${GlueDatabase}/" + table for table in contract()["tables"]
        }
        glue = resources_of("TablesRole", "glue")
        self.assertEqual(set(glue), {"glue:GetDatabase", "glue:CreateTable", "glue:GetTable", "glue:GetTables", "glue:UpdateTable"})
        self.assertEqual(sub_strings("TablesRole", "glue:GetDatabase"), {catalog + "catalog", catalog + "database/${GlueDatabase}"})
        for action in ("glue:CreateTable", "glue:GetTable", "glue:GetTables", "glue:UpdateTable"):
            self.assertEqual(sub_strings("TablesRole", action), on_tables, action)
        # The enricher's lake grants, without its dead letters.
        self.assertEqual(set(resources_of("TablesRole", "s3")), {"s3:GetObject", "s3:PutObject", "s3:ListBucket"})
        objects = {"${LakeBucket.Arn}/" + path + "/*" for path in table_paths()}
        for action in ("s3:GetObject", "s3:PutObject"):
            self.assertEqual(sub_strings("TablesRole", action), objects, action)
        self.assertEqual(list_prefixes("TablesRole"), list_prefixes("EnricherRole"))
        # A schema migration takes the commit lease, as the enricher's commits do.
        self.assertEqual(resources_of("TablesRole", "dynamodb"), resources_of("EnricherRole", "dynamodb"))
        for service in ("kinesis", "sqs", "kms"):
            self.assertEqual(resources_of("TablesRole", service), {}, service)

    def test_optimizers_touch_only_the_two_tables(self) -> None:
        # Orphan file deletion removes whatever no snapshot references: outside the tables'
        # locations that would be everything.
        objects = {"${LakeBucket.Arn}/" + path + "/*" for path in table_paths()}
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            self.assertEqual(sub_strings("TableOptimizerRole", action), objects, action)
        self.assertEqual(list_prefixes("TableOptimizerRole"), set(table_paths()) | {p + "/*" for p in table_paths()})

    def test_optimizer_role_can_be_assumed_only_by_glue_for_this_account(self) -> None:
        trust = props("TableOptimizerRole")["AssumeRolePolicyDocument"]
        for st in statements(trust):
            self.assertEqual(st["Principal"], {"Service": "glue.amazonaws.com"})
            condition = st["Condition"]
            self.assertEqual(condition["StringEquals"]["aws:SourceAccount"], {"Ref": "AWS::AccountId"})
            source_arn = condition["ArnLike"]["aws:SourceArn"]["Fn::Sub"]
            self.assertTrue(source_arn.startswith("arn:${AWS::Partition}:glue:${AWS::Region}:${AWS::AccountId}:"), source_arn)

    def test_dynamodb_grants_are_exactly_the_calls_in_the_code(self) -> None:
        # The SDK requests each role's code makes, in the crate's files that use the DynamoDB
        # client (the join state in crates/aws, the commit lease in crates/lake), against what
        # the role is granted.
        # The tables function runs the lake crate's table set-up, whose schema migration takes
        # the same lease.
        code = {"JoinerRole": "crates/aws/src", "EnricherRole": "crates/lake/src", "TablesRole": "crates/lake/src"}
        for role, folder in code.items():
            called = set()
            for path in sorted((ROOT / folder).glob("*.rs")):
                text = path.read_text(encoding="utf-8")
                if "aws_sdk_dynamodb" in text:
                    called |= {"dynamodb:" + "".join(w.capitalize() for w in m.split("_")) for m in DYNAMODB_CALL.findall(text)}
            self.assertEqual(set(resources_of(role, "dynamodb")), called, f"{role} against {folder}")

    def test_glue_create_table_is_granted_only_while_the_enricher_creates_tables(self) -> None:
        # ensure_tables creates (or re-registers) a missing table through iceberg-rust's Glue
        # catalog. The tables function runs it at deploy time; the enricher still runs it at
        # start-up (a table deleted since the deploy), and keeps the grant while it does.
        text = "".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "crates/lake/src").glob("*.rs")))
        creates = bool(re.search(r"\.(create_table|register_table)\(", text))
        self.assertEqual("glue:CreateTable" in resources_of("EnricherRole", "glue"), creates)
        self.assertIn("glue:CreateTable", resources_of("TablesRole", "glue"))
        # Nobody may create databases: the template does.
        for role in ("JoinerRole", "EnricherRole", "TablesRole"):
            self.assertNotIn("glue:CreateDatabase", resources_of(role, "glue"), role)

    def test_each_role_reads_exactly_the_streams_its_mappings_poll(self) -> None:
        for logical_id in FUNCTIONS.values():
            p = function_props(logical_id)
            role = p["Role"]["Fn::GetAtt"][0]
            polled = {referenced(e["Properties"]["Stream"]).pop() for e in p.get("Events", {}).values()}
            kinesis = resources_of(role, "kinesis")
            if polled:
                for action in ("kinesis:GetRecords", "kinesis:GetShardIterator", "kinesis:DescribeStream", "kinesis:ListShards"):
                    self.assertEqual(kinesis[action], polled, f"{role} {action}")
                self.assertEqual(resources_of(role, "kms"), {"kms:Decrypt": {"StreamKey"}, "kms:GenerateDataKey": {"StreamKey"}})
            else:
                self.assertEqual(kinesis, {}, role)
            log_group = p["LoggingConfig"]["LogGroup"]["Ref"]
            self.assertEqual(resources_of(role, "logs"), {"logs:CreateLogStream": {log_group}, "logs:PutLogEvents": {log_group}})


ACCOUNT_ROOT = "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"
# Every KMS action that uses a key rather than manages it (a grant hands out use).
KMS_USE = [
    "kms:Decrypt",
    "kms:Encrypt",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyPairWithoutPlaintext",
    "kms:GenerateRandom",
    "kms:GenerateMac",
    "kms:VerifyMac",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
    "kms:Sign",
    "kms:Verify",
    "kms:DeriveSharedSecret",
    "kms:CreateGrant",
]
VIA_STREAMS_AND_QUEUE = {"kinesis.${AWS::Region}.amazonaws.com", "sqs.${AWS::Region}.amazonaws.com"}


def via_services(statement: dict[str, Any]) -> set[str]:
    """The kms:ViaService values a statement is limited to (empty: not limited)."""
    values = statement.get("Condition", {}).get("StringEquals", {}).get("kms:ViaService", [])
    return {v["Fn::Sub"] if isinstance(v, dict) else v for v in as_list(values)}


class KeyPolicy(unittest.TestCase):
    """The stream key: administered by the account, used only through Kinesis and SQS."""

    def key_statements(self) -> list[dict[str, Any]]:
        return list(statements(props("StreamKey")["KeyPolicy"]))

    def test_every_statement_names_the_account_and_nobody_else(self) -> None:
        for st in self.key_statements():
            self.assertEqual(st["Effect"], "Allow")
            self.assertEqual(st["Principal"], {"AWS": {"Fn::Sub": ACCOUNT_ROOT}}, st.get("Sid"))

    def test_administration_grants_no_use_of_the_key(self) -> None:
        admin = [st for st in self.key_statements() if not via_services(st)]
        self.assertEqual(len(admin), 1)
        actions = as_list(admin[0]["Action"])
        self.assertNotIn("kms:*", actions)
        for use in KMS_USE:
            self.assertFalse(any(fnmatch.fnmatchcase(use, a) for a in actions), f"{use} is granted by {actions}")
        # Without it CloudFormation refuses the policy: the account could never change it again.
        self.assertTrue(any(fnmatch.fnmatchcase("kms:PutKeyPolicy", a) for a in actions))

    def test_use_goes_through_kinesis_and_sqs_only(self) -> None:
        users = [st for st in self.key_statements() if via_services(st)]
        self.assertEqual(len(users), 1)
        self.assertEqual(set(as_list(users[0]["Action"])), {"kms:Decrypt", "kms:GenerateDataKey"})
        self.assertEqual(via_services(users[0]), VIA_STREAMS_AND_QUEUE)

    def test_role_grants_of_the_key_carry_their_own_via_service_condition(self) -> None:
        wanted = {
            # The joiner reads and writes streams and writes the queue.
            "JoinerRole": {"kms:Decrypt": VIA_STREAMS_AND_QUEUE, "kms:GenerateDataKey": VIA_STREAMS_AND_QUEUE},
            # The enricher reads a stream and writes the queue only.
            "EnricherRole": {
                "kms:Decrypt": VIA_STREAMS_AND_QUEUE,
                "kms:GenerateDataKey": {"sqs.${AWS::Region}.amazonaws.com"},
            },
        }
        for role, via in wanted.items():
            found: dict[str, set[str]] = {}
            for policy in props(role)["Policies"]:
                for st in statements(policy["PolicyDocument"]):
                    for action in as_list(st["Action"]):
                        if action.startswith("kms:"):
                            self.assertTrue(via_services(st), f"{role} {action} without kms:ViaService")
                            found.setdefault(action, set()).update(via_services(st))
            self.assertEqual(found, via, role)


# Every alarm of the template: logical id -> (namespace, metric, dimension value). For the EMF
# metrics the dimension is Function (the name the code uses); for AWS metrics it is the
# resource (a logical id).
ALARMS = {
    "JoinerIteratorAgeAlarm": ("AWS/Lambda", "IteratorAge", "JoinerFunction"),
    "EnricherIteratorAgeAlarm": ("AWS/Lambda", "IteratorAge", "EnricherFunction"),
    "JoinerErrorsAlarm": ("AWS/Lambda", "Errors", "JoinerFunction"),
    "EnricherErrorsAlarm": ("AWS/Lambda", "Errors", "EnricherFunction"),
    "JoinerThrottlesAlarm": ("AWS/Lambda", "Throttles", "JoinerFunction"),
    "EnricherThrottlesAlarm": ("AWS/Lambda", "Throttles", "EnricherFunction"),
    "JoinerDurationAlarm": ("AWS/Lambda", "Duration", "JoinerFunction"),
    "EnricherDurationAlarm": ("AWS/Lambda", "Duration", "EnricherFunction"),
    "JoinerDeadLettersAlarm": ("EMF", "Rejected", "joiner"),
    "EnricherDeadLettersAlarm": ("EMF", "Rejected", "enricher"),
    "JoinerFailedAlarm": ("EMF", "Failed", "joiner"),
    "EnricherFailedAlarm": ("EMF", "Failed", "enricher"),
    "JoinerLateAlarm": ("EMF", "Late", "joiner"),
    "JoinerOutputsLostAlarm": ("EMF", "OutputsLost", "joiner"),
    "EnricherCommitRetriesAlarm": ("EMF", "CommitRetries", "enricher"),
    "EnricherForeignColumnsAlarm": ("EMF", "ForeignColumns", "enricher"),
    "OnFailureQueueAlarm": ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "OnFailureQueue"),
    "StateLogTableThrottlesAlarm": ("AWS/DynamoDB", "WriteThrottleEvents", "StateLogTable"),
    "StateLogTableReadThrottlesAlarm": ("AWS/DynamoDB", "ReadThrottleEvents", "StateLogTable"),
    "KeyedStreamWriteThrottlesAlarm": ("AWS/Kinesis", "WriteProvisionedThroughputExceeded", "KeyedStream"),
    "CommitLeaseTableThrottlesAlarm": ("AWS/DynamoDB", "WriteThrottleEvents", "CommitLeaseTable"),
    "ImpressionsStreamWriteThrottlesAlarm": ("AWS/Kinesis", "WriteProvisionedThroughputExceeded", "ImpressionsStream"),
    "ClicksStreamWriteThrottlesAlarm": ("AWS/Kinesis", "WriteProvisionedThroughputExceeded", "ClicksStream"),
    "JoinedStreamWriteThrottlesAlarm": ("AWS/Kinesis", "WriteProvisionedThroughputExceeded", "JoinedStream"),
}
# The AWS metrics the alarms may use, by namespace: (the resource type they describe, the
# dimension naming it, the metric names the service publishes with that dimension alone).
AWS_METRICS = {
    "AWS/Lambda": ("AWS::Serverless::Function", "FunctionName", {"IteratorAge", "Errors", "Throttles", "Duration"}),
    "AWS/SQS": ("AWS::SQS::Queue", "QueueName", {"ApproximateNumberOfMessagesVisible"}),
    "AWS/DynamoDB": ("AWS::DynamoDB::Table", "TableName", {"ReadThrottleEvents", "WriteThrottleEvents"}),
    "AWS/Kinesis": ("AWS::Kinesis::Stream", "StreamName", {"WriteProvisionedThroughputExceeded", "ReadProvisionedThroughputExceeded"}),
}
# Where each function builds its EMF line, and the shared writer that adds to every line.
EMF_CODE = {"joiner": ("crates/core/src/metrics.rs", "emf_line"), "enricher": ("functions/enricher/src/lib.rs", "metrics_line")}
EMF_SHARED = ("crates/core/src/metrics.rs", "emf_values")
# A metric entry of such a function: a `("Name".into(), value)` or `("Name".to_owned(), ...)`
# tuple (not a call like `root.insert("Function".into(), ...)`, which sets a property).
METRIC_ENTRY = re.compile(r'(?<![A-Za-z0-9_])\(\s*"([A-Z][A-Za-z]+)"\.(?:into|to_owned)\(\)')


def function_body(path: str, fn: str) -> str:
    text = (ROOT / path).read_text(encoding="utf-8")
    body = text[text.index(f"fn {fn}(") :]
    return body[: body.index("\n}\n")]


def emitted_metrics(function: str) -> set[str]:
    """The metric names a function's EMF line carries, read from its Rust source: the metric
    entries of the function that builds the line and of the shared writer (`ColdStart`)."""
    return set(METRIC_ENTRY.findall(function_body(*EMF_CODE[function]) + function_body(*EMF_SHARED)))


def dashboard() -> dict[str, Any]:
    """The dashboard body as CloudWatch receives it, with ${MetricsNamespace} as "NS" and every
    other ${...} as "x"."""
    body = props("Dashboard")["DashboardBody"]["Fn::Sub"]
    return json.loads(re.sub(r"\$\{[^}]+\}", "x", body.replace("${MetricsNamespace}", "NS")))


class Monitoring(unittest.TestCase):
    def alarm_resources(self) -> dict[str, dict[str, Any]]:
        return {lid: r["Properties"] for lid, r in template()["Resources"].items() if r["Type"] == "AWS::CloudWatch::Alarm"}

    def alarms(self) -> list[dict[str, Any]]:
        return list(self.alarm_resources().values())

    def test_the_alarm_list(self) -> None:
        self.assertEqual(set(self.alarm_resources()), set(ALARMS))
        for logical_id, (namespace, metric, target) in ALARMS.items():
            a = self.alarm_resources()[logical_id]
            with self.subTest(alarm=logical_id):
                self.assertEqual(a["MetricName"], metric)
                if namespace == "EMF":
                    self.assertEqual(a["Namespace"], {"Ref": "MetricsNamespace"})
                    self.assertEqual(a["Dimensions"], [{"Name": contract()["metrics"]["dimension"], "Value": target}])
                else:
                    self.assertEqual(a["Namespace"], namespace)
                    (dimension,) = a["Dimensions"]
                    self.assertEqual(referenced(dimension["Value"]), {target})

    def test_every_alarm_watches_a_metric_that_exists(self) -> None:
        for logical_id, a in self.alarm_resources().items():
            with self.subTest(alarm=logical_id):
                self.assertNotIn("Metrics", a, "one metric per alarm")
                if a["Namespace"] == {"Ref": "MetricsNamespace"}:
                    # An EMF metric: listed in the contract and carried by the function's line.
                    (dimension,) = a["Dimensions"]
                    self.assertEqual(dimension["Name"], contract()["metrics"]["dimension"])
                    function = dimension["Value"]
                    self.assertIn(function, STREAM_FUNCTIONS)
                    self.assertIn(a["MetricName"], contract()["metrics"][function])
                    self.assertIn(a["MetricName"], emitted_metrics(function))
                else:
                    resource_type, dimension_name, metrics = AWS_METRICS[a["Namespace"]]
                    self.assertIn(a["MetricName"], metrics)
                    (dimension,) = a["Dimensions"]
                    self.assertEqual(dimension["Name"], dimension_name)
                    (target,) = referenced(dimension["Value"])
                    self.assertEqual(resource(target)["Type"], resource_type)
                    if "Fn::GetAtt" in dimension["Value"]:
                        self.assertEqual(dimension["Value"]["Fn::GetAtt"][1], "QueueName")
                    else:
                        self.assertEqual(dimension["Value"], {"Ref": target})

    def test_every_alarm_notifies_the_topic_and_ignores_missing_data(self) -> None:
        topic = {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
        names = []
        for logical_id, a in self.alarm_resources().items():
            with self.subTest(alarm=logical_id):
                self.assertEqual(a["TreatMissingData"], "notBreaching")
                self.assertEqual(a["AlarmActions"], topic)
                self.assertEqual(a["OKActions"], topic)
                self.assertEqual(a["ComparisonOperator"], "GreaterThanThreshold")
                self.assertTrue(a["AlarmName"]["Fn::Sub"].startswith("adpipe-${Stage}-"))
                self.assertTrue(a.get("AlarmDescription"))
                self.assertLessEqual(a.get("DatapointsToAlarm", a["EvaluationPeriods"]), a["EvaluationPeriods"])
                names.append(a["AlarmName"]["Fn::Sub"])
        self.assertEqual(len(names), len(set(names)))

    def test_alarm_threshold_parameters_are_the_ones_an_operator_tunes(self) -> None:
        tuned = {
            "JoinerIteratorAgeAlarm": "JoinerIteratorAgeAlarmMs",
            "EnricherIteratorAgeAlarm": "EnricherIteratorAgeAlarmMs",
            "JoinerLateAlarm": "JoinerLateAlarmThreshold",
            "EnricherCommitRetriesAlarm": "EnricherCommitRetriesAlarmThreshold",
        }
        for logical_id, a in self.alarm_resources().items():
            with self.subTest(alarm=logical_id):
                if logical_id in tuned:
                    self.assertEqual(a["Threshold"], {"Ref": tuned[logical_id]})
                    self.assertGreaterEqual(int(template()["Parameters"][tuned[logical_id]]["MinValue"]), 0)
                else:
                    self.assertIsInstance(a["Threshold"], (int, float))

    def test_duration_alarms_fire_at_80_percent_of_the_timeout(self) -> None:
        for logical_id, a in self.alarm_resources().items():
            if a["MetricName"] == "Duration":
                function = a["Dimensions"][0]["Value"]["Ref"]
                timeout_ms = int(function_props(function)["Timeout"]) * 1000
                self.assertEqual(a["Threshold"], timeout_ms * 8 // 10, logical_id)
                self.assertEqual(a["Statistic"], "Maximum", logical_id)

    def test_throttle_alarms_cover_every_table_and_stream(self) -> None:
        for type_, metric in (("AWS::DynamoDB::Table", "WriteThrottleEvents"), ("AWS::Kinesis::Stream", "WriteProvisionedThroughputExceeded")):
            for logical_id, res in template()["Resources"].items():
                if res["Type"] == type_:
                    matching = [a for a in self.alarms() if a["MetricName"] == metric and referenced(a["Dimensions"][0]["Value"]) == {logical_id}]
                    self.assertEqual(len(matching), 1, logical_id)
        # WriteThrottleEvents counts every throttled request only where the code makes no reads:
        # a table that is read (GetItem, Query, ...) needs a ReadThrottleEvents alarm as well.
        writes = {"dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:BatchWriteItem"}
        for role in ("JoinerRole", "EnricherRole", "TablesRole"):
            for action, tables in resources_of(role, "dynamodb").items():
                if action in writes:
                    continue
                for table in tables:
                    reads = [a for a in self.alarms() if a["MetricName"] == "ReadThrottleEvents" and referenced(a["Dimensions"][0]["Value"]) == {table}]
                    self.assertEqual(len(reads), 1, f"{role} {action} on {table}")

    def test_lambda_alarms_cover_iterator_age_errors_and_throttles_of_both_functions(self) -> None:
        for logical_id in STREAM_FUNCTIONS.values():
            for metric in ("IteratorAge", "Errors", "Throttles", "Duration"):
                matching = [
                    a
                    for a in self.alarms()
                    if a["Namespace"] == "AWS/Lambda"
                    and a["MetricName"] == metric
                    and a["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": logical_id}}]
                ]
                self.assertEqual(len(matching), 1, f"{logical_id} {metric}")

    def test_dead_letter_and_failure_alarms_use_the_emf_metrics_of_each_function(self) -> None:
        dimension = contract()["metrics"]["dimension"]
        for function in STREAM_FUNCTIONS:
            for metric in ("Rejected", "Failed"):
                matching = [
                    a
                    for a in self.alarms()
                    if a["Namespace"] == {"Ref": "MetricsNamespace"}
                    and a["MetricName"] == metric
                    and a["Dimensions"] == [{"Name": dimension, "Value": function}]
                ]
                self.assertEqual(len(matching), 1, f"{function} {metric}")
        self.assertEqual(template()["Parameters"]["MetricsNamespace"]["Default"], "adpipe")

    def test_the_emf_metrics_the_contract_lists_are_the_ones_the_code_emits(self) -> None:
        for function in STREAM_FUNCTIONS:
            self.assertEqual(emitted_metrics(function), set(contract()["metrics"][function]), function)
        # The parser sees what it must: the alarms' metrics, and not the line's properties.
        self.assertLessEqual({"Failed", "Rejected", "Late", "Impressions", "Joined"}, emitted_metrics("joiner"))
        self.assertLessEqual({"Failed", "Rejected", "CommitRetries"}, emitted_metrics("enricher"))
        self.assertFalse({"Function", "RequestId"} & (emitted_metrics("joiner") | emitted_metrics("enricher")))

    def test_dashboard_shows_every_emf_metric_of_both_functions(self) -> None:
        shown = {
            (m[1], m[3])
            for w in dashboard()["widgets"]
            for m in w["properties"].get("metrics", [])
            if m[0] == "NS" and m[2] == contract()["metrics"]["dimension"]
        }
        for function in STREAM_FUNCTIONS:
            for metric in contract()["metrics"][function]:
                self.assertIn((metric, function), shown)

    def test_dashboard_substitutions_name_parameters_resources_or_pseudo_parameters(self) -> None:
        body = props("Dashboard")["DashboardBody"]["Fn::Sub"]
        known = set(template()["Parameters"]) | set(template()["Resources"]) | {"AWS::Region", "AWS::AccountId", "AWS::Partition"}
        for ref in re.findall(r"\$\{([^}]+)\}", body):
            self.assertIn(ref.split(".")[0] if "::" not in ref else ref, known, ref)
        self.assertNotIn("${!", body)

    def test_dashboard_has_a_business_row_of_impressions_and_ctr_per_minute(self) -> None:
        widgets = [w for w in dashboard()["widgets"] if w["properties"]["title"].startswith("Business:")]
        self.assertEqual(len(widgets), 2)
        self.assertEqual({w["y"] for w in widgets}, {max(w["y"] for w in dashboard()["widgets"])})
        impressions = ["NS", "Impressions", contract()["metrics"]["dimension"], "joiner"]
        for w in widgets:
            self.assertEqual((w["properties"]["stat"], w["properties"]["period"]), ("Sum", 60))
        per_minute, ctr = sorted(widgets, key=lambda w: w["x"])
        self.assertEqual([m[:4] for m in per_minute["properties"]["metrics"]], [impressions])
        rows = ctr["properties"]["metrics"]
        ids = {m[-1]["id"]: m[:4] for m in rows if isinstance(m[0], str)}
        self.assertEqual(ids, {"joined": ["NS", "Joined", "Function", "joiner"], "impressions": impressions})
        (expression,) = [m[0] for m in rows if isinstance(m[0], dict)]
        self.assertEqual(expression["expression"].replace(" ", ""), "100*joined/impressions")
        self.assertTrue(all(m[-1].get("visible") is False for m in rows if isinstance(m[0], str)))


class ParameterInterface(unittest.TestCase):
    """AWS::CloudFormation::Interface: every parameter in exactly one group, with a label."""

    def interface(self) -> dict[str, Any]:
        return template()["Metadata"]["AWS::CloudFormation::Interface"]

    def test_every_parameter_is_in_exactly_one_group_and_has_a_label(self) -> None:
        params = list(template()["Parameters"])
        grouped = [p for g in self.interface()["ParameterGroups"] for p in g["Parameters"]]
        self.assertEqual(sorted(grouped), sorted(params), "each parameter exactly once")
        for group in self.interface()["ParameterGroups"]:
            self.assertTrue(group["Label"]["default"], group)
            self.assertTrue(group["Parameters"], group)
        labels = self.interface()["ParameterLabels"]
        self.assertEqual(set(labels), set(params))
        for param, label in labels.items():
            self.assertIsInstance(label["default"], str, param)
            self.assertTrue(label["default"].strip(), param)
        self.assertEqual(len({l["default"] for l in labels.values()}), len(labels), "labels are distinct")

    def test_parameters_are_declared_in_group_order(self) -> None:
        # `sam deploy --guided` asks for the parameters in template order, not by group.
        grouped = [p for g in self.interface()["ParameterGroups"] for p in g["Parameters"]]
        self.assertEqual(list(template()["Parameters"]), grouped)

    def test_every_parameter_is_described(self) -> None:
        for name, param in template()["Parameters"].items():
            self.assertTrue(param.get("Description"), name)


class NamedQueries(unittest.TestCase):
    def test_named_queries_are_the_sql_files_verbatim(self) -> None:
        text = TEMPLATE.read_text(encoding="utf-8")
        rendered, embedded = template_sql.embed(text, ROOT / "sql")
        self.assertEqual(rendered, text, "run `python3 tools/template_sql.py`")
        files = sorted(f"sql/{p.name}" for p in (ROOT / "sql").glob("*.sql"))
        self.assertEqual(sorted(embedded), files)
        queries = {
            p["QueryString"]
            for r in template()["Resources"].values()
            if r["Type"] == "AWS::Athena::NamedQuery"
            for p in [r["Properties"]]
        }
        self.assertEqual(queries, {(ROOT / f).read_text(encoding="utf-8") for f in files})
        for r in template()["Resources"].values():
            if r["Type"] == "AWS::Athena::NamedQuery":
                self.assertEqual(r["Properties"]["Database"], {"Ref": "GlueDatabase"})
                self.assertEqual(r["Properties"]["WorkGroup"], {"Ref": "AthenaWorkGroup"})


class SamLevelLint(unittest.TestCase):
    """The SAM-level lint must pass, and must catch what plain cfn-lint does not."""

    def test_template_passes(self) -> None:
        self.assertEqual(sam_lint.problems(TEMPLATE.read_text(encoding="utf-8")), [])

    def assert_caught(self, old: str, new: str, expect: str) -> None:
        text = TEMPLATE.read_text(encoding="utf-8")
        self.assertIn(old, text)
        found = sam_lint.problems(text.replace(old, new, 1))
        self.assertTrue(any(expect in p for p in found), found)

    def test_catches_a_misspelt_event_property(self) -> None:
        self.assert_caught(
            "FunctionResponseTypes: [ReportBatchItemFailures]",
            "FunctionResponseType: [ReportBatchItemFailures]",
            "property FunctionResponseType not defined",
        )

    def test_catches_misspelt_values(self) -> None:
        self.assert_caught(
            "FunctionResponseTypes: [ReportBatchItemFailures]",
            "FunctionResponseTypes: [ReportBatchItemFailure]",
            "'ReportBatchItemFailure' is not one of",
        )
        self.assert_caught("StartingPosition: TRIM_HORIZON", "StartingPosition: TRIM_HORIZN", "'TRIM_HORIZN' does not match")
        self.assert_caught("Runtime: provided.al2023", "Runtime: provided.al2O23", "'provided.al2O23' is not one of")


def doc_table(path: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header line starts with `header`, cells stripped."""
    lines = (ROOT / path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


class DocsMatchTemplate(unittest.TestCase):
    """The tables of docs/DEPLOY.md that list what template.yaml declares (parameters and their
    defaults, outputs, alarms, what a deleted stack keeps and what a re-attach imports) are
    checked against it, so a change to the template that the docs miss fails here."""

    def test_the_outputs_table_lists_every_output(self) -> None:
        listed = [name for row in doc_table("docs/DEPLOY.md", "| output | what |") for name in ticked(row[0])]
        self.assertEqual(len(listed), len(set(listed)), "an output listed twice")
        self.assertEqual(set(listed), set(template()["Outputs"]))

    def test_the_parameters_table_lists_every_parameter_with_its_default(self) -> None:
        params = template()["Parameters"]
        listed = []
        for row in doc_table("docs/DEPLOY.md", "| parameter | default | what |"):
            names = ticked(row[0])
            # "30 (at least 7)", "`true`, 2", "empty": the defaults in the names' order.
            defaults = [re.sub(r"\s*\(.*\)$", "", d).strip().strip("`") for d in row[1].split(",")]
            self.assertEqual(len(defaults), len(names), row)
            for name, default in zip(names, defaults):
                with self.subTest(parameter=name):
                    self.assertIn(name, params)
                    want = str(params[name].get("Default", ""))
                    self.assertEqual("" if default == "empty" else default.replace(",", ""), want)
                listed.append(name)
        self.assertEqual(sorted(listed), sorted(params), "every parameter, once")

    def test_the_alarm_table_and_count_are_the_template_s(self) -> None:
        names = set()
        for logical_id, res in template()["Resources"].items():
            if res["Type"] == "AWS::CloudWatch::Alarm":
                name = res["Properties"]["AlarmName"]
                text = name["Fn::Sub"] if isinstance(name, dict) else name
                names.add(text.replace("adpipe-${Stage}", "*"))
        listed = {n for row in doc_table("docs/DEPLOY.md", "| alarm | metric | fires when |") for n in ticked(row[0])}
        self.assertEqual(listed, names)
        text = (ROOT / "docs/DEPLOY.md").read_text()
        self.assertIn(f"Alarms ({len(names)};", text)
        self.assertIn(f"{len(names)} alarms", text)

    def test_what_a_deleted_stack_keeps_and_a_re_attach_imports_is_every_retained_resource(self) -> None:
        retained_ids = {lid for lid, res in template()["Resources"].items() if retained(res)}
        kept = doc_table("docs/DEPLOY.md", "| kept | why |")
        # One row per retained resource, the streams together in one row that says how many.
        streams = {lid for lid in retained_ids if resource(lid)["Type"] == "AWS::Kinesis::Stream"}
        self.assertEqual(len(kept), len(retained_ids) - len(streams) + 1)
        words = {2: "two", 3: "three", 4: "four", 5: "five"}
        self.assertTrue(any(row[0].startswith(f"the {words[len(streams)]} streams") for row in kept), kept)
        text = (ROOT / "docs/DEPLOY.md").read_text()
        section = text[text.index("## Re-attaching a retained lake") :]
        section = section[: section.index("\n## ", 1)]
        for logical_id in sorted(retained_ids - {"IcebergTables"}):
            with self.subTest(resource=logical_id):
                self.assertIn(f"`{logical_id}`", section, "the re-attach section names it")

    def test_no_doc_says_the_tables_are_partitioned_by_day(self) -> None:
        for path in ("docs/DEPLOY.md", "docs/SCHEMAS.md", "docs/DESIGN.md", "README.md"):
            text = (ROOT / path).read_text()
            with self.subTest(doc=path):
                found = re.search(r".{60}partitioned by day.{60}", text, re.S)
                self.assertIsNone(found, found and found.group(0))


if __name__ == "__main__":
    unittest.main()
