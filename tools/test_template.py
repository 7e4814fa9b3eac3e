"""Tests over template.yaml: it agrees with deploy/resources.json, grants least privilege (the
grants against the calls in the Rust code, the key policy, the optimizer role's trust), keeps
what holds data when the stack goes, never lets a lifecycle rule expire the lake, wires the
event source mappings and alarms as docs/DEPLOY.md says, embeds the sql/ files, and passes the
SAM-level lint (which must catch misspelt properties that plain cfn-lint lets through).

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
FUNCTIONS = {"joiner": "JoinerFunction", "enricher": "EnricherFunction"}


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
        for function, logical_id in FUNCTIONS.items():
            env = props(logical_id)["Environment"]["Variables"]
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
        for function, spec in c["functions"].items():
            logical_id = FUNCTIONS[function]
            p = props(logical_id)
            self.assertEqual(int(p["Timeout"]), spec["timeout_seconds"], f"{logical_id}.Timeout")
            self.assertEqual(p["CodeUri"], f"functions/{spec['binary']}")
            streams = {c["resources"][s]["logical_id"] for s in spec["sources"]}
            self.assertEqual({referenced(e["Properties"]["Stream"]).pop() for e in p["Events"].values()}, streams)
            for name, event in p["Events"].items():
                e = event["Properties"]
                for prop, source in c["mappings"][function].items():
                    actual = e["DestinationConfig"]["OnFailure"]["Destination"] if prop == "OnFailure" else e.get(prop)
                    check(f"{logical_id}.{name}.{prop}", actual, source)
        for stage, spec in c["stages"].items():
            for param in spec["parameter_overrides"]:
                self.assertIn(param, params, f"stage {stage} overrides an unknown parameter")

    def test_lake_tables_are_the_enricher_s_not_the_template_s(self) -> None:
        # The enricher creates them (partition spec, field ids, commit.retry.num-retries = 0);
        # an AWS::Glue::Table here could set none of that, and a stack update would break it.
        types = {r["Type"] for r in template()["Resources"].values()}
        self.assertNotIn("AWS::Glue::Table", types)
        tables = set(contract()["tables"])
        env = props("EnricherFunction")["Environment"]["Variables"]
        self.assertEqual({env["CLICKS_TABLE"], env["IMPRESSIONS_TABLE"]}, tables)
        outputs = {o["Value"] for o in template()["Outputs"].values() if isinstance(o["Value"], str)}
        self.assertLessEqual(tables, outputs)
        optimized = {r["Properties"]["TableName"] for r in template()["Resources"].values() if r["Type"] == "AWS::Glue::TableOptimizer"}
        self.assertEqual(optimized, tables)
        for table in tables:
            spec = contract()["tables"][table]
            self.assertEqual([c["id"] for c in spec["columns"]], list(range(1, len(spec["columns"]) + 1)))

    def test_table_optimizers_wait_for_the_tables_and_keep_enough_snapshots(self) -> None:
        params = template()["Parameters"]
        # An optimizer needs its table, which exists only after the enricher's first start.
        self.assertEqual(params["EnableTableOptimizers"]["Default"], "false")
        # The enricher finds committed batches in the snapshot ancestry; a replay can be as old
        # as the stream retention plus the mappings' maximum record age.
        kept = int(params["SnapshotRetentionDays"]["Default"]) * 86400
        replay = int(params["StreamRetentionHours"]["Default"]) * 3600 + int(params["MaximumRecordAgeSeconds"]["Default"])
        self.assertGreaterEqual(kept, replay)

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
        for role in ("JoinerRole", "EnricherRole"):
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


def retained(res: dict[str, Any]) -> bool:
    return res.get("DeletionPolicy") == "Retain" and res.get("UpdateReplacePolicy") == "Retain"


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
            "StateTable",
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

    def test_state_table_is_protected_from_deletion(self) -> None:
        self.assertIs(props("StateTable")["DeletionProtectionEnabled"], True)
        for logical_id, res in template()["Resources"].items():
            if res["Type"] == "AWS::DynamoDB::Table" and res["Properties"].get("DeletionProtectionEnabled"):
                # Otherwise deleting the stack fails on the table instead of leaving it behind.
                self.assertTrue(retained(res), logical_id)


class Functions(unittest.TestCase):
    def test_functions_are_arm64_al2023_rust_builds(self) -> None:
        for function, logical_id in FUNCTIONS.items():
            with self.subTest(function=function):
                res = resource(logical_id)
                self.assertEqual(res["Metadata"], {"BuildMethod": "rust-cargolambda", "BuildProperties": {"Binary": function}})
                p = res["Properties"]
                self.assertEqual(p["Runtime"], "provided.al2023")
                self.assertEqual(p["Architectures"], ["arm64"])
                self.assertEqual(p["CodeUri"], f"functions/{function}")
                self.assertNotIn("Policies", p, "hand-written roles only, no SAM policy templates")
                self.assertEqual(p["Role"], {"Fn::GetAtt": [f"{function.capitalize()}Role", "Arn"]})

    def test_event_source_mappings_are_bounded_partial_batch_mappings_with_a_destination(self) -> None:
        streams = {"JoinerFunction": {"ImpressionsStream", "ClicksStream"}, "EnricherFunction": {"JoinedStream"}}
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

    def test_recovery_lease_cannot_be_shorter_than_the_joiner_timeout(self) -> None:
        lease = template()["Parameters"]["RecoveryLeaseSeconds"]
        self.assertGreaterEqual(int(lease["MinValue"]), int(props("JoinerFunction")["Timeout"]))

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
                        self.assertNotEqual(res, "*")
                        text = res if isinstance(res, str) else res.get("Fn::Sub", "")
                        if isinstance(text, str) and text.startswith("arn:"):
                            # arn:partition:service:region:account:resource, resource not a bare *
                            self.assertFalse(text.split(":", 5)[5].startswith("*"), text)

    def test_joiner_only_updates_join_state_and_writes_its_own_prefixes(self) -> None:
        self.assertEqual(resources_of("JoinerRole", "dynamodb"), {"dynamodb:UpdateItem": {"StateTable"}})
        self.assertEqual(resources_of("JoinerRole", "kinesis")["kinesis:PutRecords"], {"JoinedStream"})
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
        code = {"JoinerRole": "crates/aws/src", "EnricherRole": "crates/lake/src"}
        for role, folder in code.items():
            called = set()
            for path in sorted((ROOT / folder).glob("*.rs")):
                text = path.read_text(encoding="utf-8")
                if "aws_sdk_dynamodb" in text:
                    called |= {"dynamodb:" + "".join(w.capitalize() for w in m.split("_")) for m in DYNAMODB_CALL.findall(text)}
            self.assertEqual(set(resources_of(role, "dynamodb")), called, f"{role} against {folder}")

    def test_glue_create_table_is_granted_only_while_the_enricher_creates_tables(self) -> None:
        # ensure_tables creates (or re-registers) a missing table through iceberg-rust's Glue
        # catalog. Once table creation moves to deploy time, this grant should go.
        text = "".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "crates/lake/src").glob("*.rs")))
        creates = bool(re.search(r"\.(create_table|register_table)\(", text))
        self.assertEqual("glue:CreateTable" in resources_of("EnricherRole", "glue"), creates)

    def test_each_role_reads_exactly_the_streams_its_mappings_poll(self) -> None:
        for logical_id in FUNCTIONS.values():
            role = props(logical_id)["Role"]["Fn::GetAtt"][0]
            polled = {referenced(e["Properties"]["Stream"]).pop() for e in props(logical_id)["Events"].values()}
            kinesis = resources_of(role, "kinesis")
            for action in ("kinesis:GetRecords", "kinesis:GetShardIterator", "kinesis:DescribeStream", "kinesis:ListShards"):
                self.assertEqual(kinesis[action], polled, f"{role} {action}")
            self.assertEqual(resources_of(role, "kms"), {"kms:Decrypt": {"StreamKey"}, "kms:GenerateDataKey": {"StreamKey"}})
            log_group = props(logical_id)["LoggingConfig"]["LogGroup"]["Ref"]
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


class Monitoring(unittest.TestCase):
    def alarms(self) -> list[dict[str, Any]]:
        return [r["Properties"] for r in template()["Resources"].values() if r["Type"] == "AWS::CloudWatch::Alarm"]

    def test_lambda_alarms_cover_iterator_age_errors_and_throttles_of_both_functions(self) -> None:
        for logical_id in FUNCTIONS.values():
            for metric in ("IteratorAge", "Errors", "Throttles"):
                matching = [
                    a
                    for a in self.alarms()
                    if a["Namespace"] == "AWS/Lambda"
                    and a["MetricName"] == metric
                    and a["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": logical_id}}]
                ]
                self.assertEqual(len(matching), 1, f"{logical_id} {metric}")

    def test_dead_letter_alarms_use_the_emf_metric_of_each_function(self) -> None:
        dimension = contract()["metrics"]["dimension"]
        for function in FUNCTIONS:
            matching = [
                a
                for a in self.alarms()
                if a["Namespace"] == {"Ref": "MetricsNamespace"}
                and a["MetricName"] == "Rejected"
                and a["Dimensions"] == [{"Name": dimension, "Value": function}]
            ]
            self.assertEqual(len(matching), 1, function)
        self.assertEqual(template()["Parameters"]["MetricsNamespace"]["Default"], "adpipe")

    def test_dashboard_shows_every_emf_metric_of_both_functions(self) -> None:
        body = props("Dashboard")["DashboardBody"]["Fn::Sub"]
        # Substitute the ${...} references so the body parses as the JSON CloudWatch receives.
        dashboard = json.loads(re.sub(r"\$\{[^}]+\}", "x", body.replace("${MetricsNamespace}", "NS")))
        shown = {
            (m[1], m[3])
            for w in dashboard["widgets"]
            for m in w["properties"].get("metrics", [])
            if m[0] == "NS" and m[2] == contract()["metrics"]["dimension"]
        }
        for function in FUNCTIONS:
            for metric in contract()["metrics"][function]:
                self.assertIn((metric, function), shown)


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


if __name__ == "__main__":
    unittest.main()
