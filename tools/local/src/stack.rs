//! A deployed stack as the target of `adpipe --stack NAME`: the names the commands need, read
//! from the stack's CloudFormation outputs (`DescribeStacks`), the keys `template.yaml`
//! declares under `Outputs`.

use std::collections::BTreeMap;

use crate::LocalError;

/// Output keys of `template.yaml` the commands read.
pub const IMPRESSIONS_STREAM_OUTPUT: &str = "ImpressionsStreamName";
pub const CLICKS_STREAM_OUTPUT: &str = "ClicksStreamName";
pub const JOINED_STREAM_OUTPUT: &str = "JoinedStreamName";
pub const ON_FAILURE_QUEUE_OUTPUT: &str = "OnFailureQueueUrl";
pub const IMPRESSIONS_STREAM_ARN_OUTPUT: &str = "ImpressionsStreamArn";
pub const CLICKS_STREAM_ARN_OUTPUT: &str = "ClicksStreamArn";
pub const JOINED_STREAM_ARN_OUTPUT: &str = "JoinedStreamArn";
pub const JOINER_FUNCTION_OUTPUT: &str = "JoinerFunctionName";
pub const ENRICHER_FUNCTION_OUTPUT: &str = "EnricherFunctionName";
pub const LAKE_BUCKET_OUTPUT: &str = "LakeBucketName";
pub const GLUE_DATABASE_OUTPUT: &str = "GlueDatabaseName";
pub const CLICKS_TABLE_OUTPUT: &str = "EnrichedClicksTableName";
pub const IMPRESSIONS_TABLE_OUTPUT: &str = "ImpressionsTableName";
pub const WORKGROUP_OUTPUT: &str = "AthenaWorkGroupName";
pub const STATE_LOG_TABLE_OUTPUT: &str = "StateLogTableName";
pub const COMMIT_LEASE_TABLE_OUTPUT: &str = "CommitLeaseTableName";
pub const METRICS_NAMESPACE_OUTPUT: &str = "MetricsNamespace";

/// What `generate`, `replay` and `redrive` act on in a deployed stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackTarget {
    pub stack: String,
    pub impressions_stream: String,
    pub clicks_stream: String,
    pub joined_stream: String,
    /// The mappings' on-failure destination (pointers to the batches Lambda gave up on).
    pub on_failure_queue_url: String,
    /// Every output of the stack, for the commands that need more ([`StackTarget::output`]).
    pub outputs: BTreeMap<String, String>,
    /// The stack's parameter values (as deployed, defaults included).
    pub parameters: BTreeMap<String, String>,
}

impl StackTarget {
    /// The target from a stack's outputs (key → value); a missing output is an error that
    /// names it.
    pub fn from_outputs(
        stack: &str,
        outputs: &BTreeMap<String, String>,
    ) -> Result<StackTarget, LocalError> {
        let get = |key: &str| {
            outputs
                .get(key)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or_else(|| {
                    LocalError::Stack(format!(
                        "stack {stack} has no output {key} (is it adpipe's template.yaml?)"
                    ))
                })
        };
        Ok(StackTarget {
            stack: stack.to_owned(),
            impressions_stream: get(IMPRESSIONS_STREAM_OUTPUT)?,
            clicks_stream: get(CLICKS_STREAM_OUTPUT)?,
            joined_stream: get(JOINED_STREAM_OUTPUT)?,
            on_failure_queue_url: get(ON_FAILURE_QUEUE_OUTPUT)?,
            outputs: outputs.clone(),
            parameters: BTreeMap::new(),
        })
    }

    /// One more output; a missing one is an error that names it.
    pub fn output(&self, key: &str) -> Result<&str, LocalError> {
        self.outputs
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                LocalError::Stack(format!(
                    "stack {} has no output {key} (deployed from an older template.yaml? \
                     `sam deploy` it again)",
                    self.stack
                ))
            })
    }

    /// Reads the stack's outputs with `DescribeStacks`.
    pub async fn resolve(
        cfn: &aws_sdk_cloudformation::Client,
        stack: &str,
    ) -> Result<StackTarget, LocalError> {
        let (outputs, parameters) = stack_outputs(cfn, stack).await?;
        let mut target = StackTarget::from_outputs(stack, &outputs)?;
        target.parameters = parameters;
        Ok(target)
    }
}

impl StackTarget {
    /// The functions' environment against this stack, for `cargo lambda watch --env-file`
    /// (the functions then run on this machine and read and write the deployed streams,
    /// tables and bucket with the default credential chain): every variable the template sets
    /// for the joiner and the enricher, from `deploy/resources.json`'s `env`, which the
    /// template tests hold to `template.yaml` and the deploy contract tests to what the code
    /// reads. A resource's name comes from the output the contract names for it, a parameter's
    /// value from the stack's parameters (its default if the stack has none: a comment says
    /// so), a fixed value as it is.
    pub fn lambda_env_file(&self) -> Result<String, LocalError> {
        let contract: serde_json::Value = serde_json::from_str(crate::resources::CONTRACT)
            .map_err(|e| LocalError::Stack(format!("deploy/resources.json: {e}")))?;
        let mut vars: BTreeMap<String, String> = BTreeMap::new();
        let mut notes = Vec::new();
        for function in ["joiner", "enricher"] {
            let env = contract["env"][function].as_object().ok_or_else(|| {
                LocalError::Stack(format!("deploy/resources.json has no env.{function}"))
            })?;
            for (var, source) in env {
                let value = self.env_value(&contract, var, source, &mut notes)?;
                if let Some(other) = vars.insert(var.clone(), value.clone()) {
                    if other != value {
                        return Err(LocalError::Stack(format!(
                            "{var} is {other:?} for one function and {value:?} for another"
                        )));
                    }
                }
            }
        }
        let mut out = format!(
            "# Written by `adpipe --stack {} env`: the functions' environment against the \
             deployed stack's resources.\n",
            self.stack
        );
        for note in notes {
            out.push_str(&format!("# {note}\n"));
        }
        if let Some(region) = self.outputs.get("Region") {
            out.push_str(&format!("AWS_REGION={region}\n"));
        }
        for (k, v) in vars {
            out.push_str(&format!("{k}={v}\n"));
        }
        Ok(out)
    }

    fn env_value(
        &self,
        contract: &serde_json::Value,
        var: &str,
        source: &serde_json::Value,
        notes: &mut Vec<String>,
    ) -> Result<String, LocalError> {
        use serde_json::Value;
        if let Some(resource) = source.get("resource").and_then(Value::as_str) {
            let output = contract["resources"][resource]["output"]
                .as_str()
                .ok_or_else(|| {
                    LocalError::Stack(format!(
                        "deploy/resources.json names no output for {resource} ({var})"
                    ))
                })?;
            return self.output(output).map(str::to_owned);
        }
        if let Some(parameter) = source.get("parameter").and_then(Value::as_str) {
            if let Some(v) = self.parameters.get(parameter) {
                return Ok(v.clone());
            }
            let default = source.get("default").and_then(Value::as_str).unwrap_or("");
            notes.push(format!(
                "{var}: the stack has no parameter {parameter}; the template's default {default:?}"
            ));
            return Ok(default.to_owned());
        }
        match source.get("value") {
            Some(Value::String(v)) => Ok(v.clone()),
            Some(v) => Ok(v.to_string()),
            None => Err(LocalError::Stack(format!(
                "deploy/resources.json: {var} has neither resource, parameter nor value"
            ))),
        }
    }
}

/// Outputs naming the stack's buckets: what `adpipe --stack NAME empty-buckets` empties.
pub const BUCKET_OUTPUTS: [&str; 3] = [
    LAKE_BUCKET_OUTPUT,
    "AthenaResultsBucketName",
    "LakeDataEventsBucketName",
];

impl StackTarget {
    /// The stack's buckets, if the stack was deployed to be disposable (`RetainData=false`):
    /// emptying the buckets of a stack that keeps its data would destroy what the stack is
    /// set to keep, so it is refused.
    pub fn disposable_buckets(&self) -> Result<Vec<String>, LocalError> {
        match self.parameters.get("RetainData").map(String::as_str) {
            Some("false") => {}
            other => {
                return Err(LocalError::Stack(format!(
                    "stack {} keeps its data (RetainData is {}): its buckets are not emptied. \
                     Deploy it with RetainData=false first if it is really disposable",
                    self.stack,
                    other.unwrap_or("not set, so the template's default, true")
                )))
            }
        }
        Ok(BUCKET_OUTPUTS
            .iter()
            .filter_map(|k| self.outputs.get(*k))
            .filter(|b| !b.is_empty())
            .cloned()
            .collect())
    }
}

/// Deletes every object version and delete marker of a bucket (1,000 per request), or with
/// `dry_run` only counts them. Returns how many.
pub async fn empty_bucket(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    dry_run: bool,
) -> Result<u64, LocalError> {
    use aws_sdk_s3::types::{Delete, ObjectIdentifier};
    let mut total = 0u64;
    loop {
        let page = s3
            .list_object_versions()
            .bucket(bucket)
            .max_keys(1000)
            .send()
            .await
            .map_err(|e| LocalError::aws("S3 ListObjectVersions", e))?;
        let mut ids = Vec::new();
        let versions = page.versions().iter().map(|v| (v.key(), v.version_id()));
        let markers = page
            .delete_markers()
            .iter()
            .map(|m| (m.key(), m.version_id()));
        for (key, version) in versions.chain(markers) {
            let Some(key) = key else { continue };
            let id = ObjectIdentifier::builder()
                .key(key)
                .set_version_id(version.map(str::to_owned))
                .build()
                .map_err(|e| LocalError::Stack(format!("object {key}: {e}")))?;
            ids.push(id);
        }
        if ids.is_empty() {
            return Ok(total);
        }
        total += ids.len() as u64;
        if dry_run {
            // Counting only: the listing does not shrink, so follow its markers instead.
            if page.is_truncated() != Some(true) {
                return Ok(total);
            }
            let more = count_rest(s3, bucket, &page).await?;
            return Ok(total + more);
        }
        let delete = Delete::builder()
            .set_objects(Some(ids))
            .quiet(true)
            .build()
            .map_err(|e| LocalError::Stack(format!("bucket {bucket}: {e}")))?;
        let out = s3
            .delete_objects()
            .bucket(bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| LocalError::aws("S3 DeleteObjects", e))?;
        if let Some(err) = out.errors().first() {
            return Err(LocalError::Stack(format!(
                "bucket {bucket}: {} could not be deleted: {} {}",
                err.key().unwrap_or_default(),
                err.code().unwrap_or_default(),
                err.message().unwrap_or_default()
            )));
        }
    }
}

/// The versions and delete markers after a listing page, counted.
async fn count_rest(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    first: &aws_sdk_s3::operation::list_object_versions::ListObjectVersionsOutput,
) -> Result<u64, LocalError> {
    let (mut key, mut version) = (
        first.next_key_marker().map(str::to_owned),
        first.next_version_id_marker().map(str::to_owned),
    );
    let mut total = 0;
    while key.is_some() {
        let page = s3
            .list_object_versions()
            .bucket(bucket)
            .set_key_marker(key.take())
            .set_version_id_marker(version.take())
            .send()
            .await
            .map_err(|e| LocalError::aws("S3 ListObjectVersions", e))?;
        total += (page.versions().len() + page.delete_markers().len()) as u64;
        if page.is_truncated() == Some(true) {
            key = page.next_key_marker().map(str::to_owned);
            version = page.next_version_id_marker().map(str::to_owned);
        }
    }
    Ok(total)
}

/// The outputs and the parameters of one stack, key → value each.
pub async fn stack_outputs(
    cfn: &aws_sdk_cloudformation::Client,
    stack: &str,
) -> Result<(BTreeMap<String, String>, BTreeMap<String, String>), LocalError> {
    let out = cfn
        .describe_stacks()
        .stack_name(stack)
        .send()
        .await
        .map_err(|e| {
            use aws_sdk_cloudformation::error::ProvideErrorMetadata;
            match (e.code(), e.message()) {
                // "Stack with id NAME does not exist": the name or the region is wrong.
                (Some("ValidationError"), Some(m)) => LocalError::Stack(format!(
                    "{m} (is the region right? --region, AWS_REGION or the profile's)"
                )),
                _ => LocalError::aws("CloudFormation DescribeStacks", e),
            }
        })?;
    let found = out
        .stacks()
        .first()
        .ok_or_else(|| LocalError::Stack(format!("no stack {stack}")))?;
    let outputs = found
        .outputs()
        .iter()
        .filter_map(|o| Some((o.output_key()?.to_owned(), o.output_value()?.to_owned())))
        .collect();
    let parameters = found
        .parameters()
        .iter()
        .filter_map(|p| {
            let value = p.resolved_value().or(p.parameter_value())?;
            Some((p.parameter_key()?.to_owned(), value.to_owned()))
        })
        .collect();
    Ok((outputs, parameters))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outputs() -> BTreeMap<String, String> {
        [
            (IMPRESSIONS_STREAM_OUTPUT, "dev-impressions"),
            (CLICKS_STREAM_OUTPUT, "dev-clicks"),
            (JOINED_STREAM_OUTPUT, "dev-joined"),
            (ON_FAILURE_QUEUE_OUTPUT, "https://sqs/q"),
            ("DashboardName", "d"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn names_come_from_the_outputs() {
        let t = StackTarget::from_outputs("adpipe-dev", &outputs()).unwrap();
        assert_eq!(
            t,
            StackTarget {
                stack: "adpipe-dev".into(),
                impressions_stream: "dev-impressions".into(),
                clicks_stream: "dev-clicks".into(),
                joined_stream: "dev-joined".into(),
                on_failure_queue_url: "https://sqs/q".into(),
                outputs: outputs(),
                parameters: BTreeMap::new(),
            }
        );
        assert_eq!(t.output("DashboardName").unwrap(), "d");
        let e = t.output(WORKGROUP_OUTPUT).unwrap_err().to_string();
        assert!(e.contains("AthenaWorkGroupName"), "{e}");
    }

    /// Every variable either function reads gets a value: resources through the outputs the
    /// contract names, parameters from the stack (or their defaults, said in a comment).
    #[test]
    fn the_env_file_sets_every_variable_of_both_functions() {
        use adpipe_core::config::{EnricherConfig, JoinerConfig, ENRICHER_ENV, JOINER_ENV};
        let contract: serde_json::Value = serde_json::from_str(crate::resources::CONTRACT).unwrap();
        let mut o = outputs();
        for spec in contract["resources"].as_object().unwrap().values() {
            if let Some(key) = spec["output"].as_str() {
                o.entry(key.to_owned())
                    .or_insert_with(|| format!("out-{key}"));
            }
        }
        let mut t = StackTarget::from_outputs("adpipe-dev", &o).unwrap();
        t.parameters
            .insert("WarmWindowSeconds".into(), "5000".into());
        let file = t.lambda_env_file().unwrap();
        let env: BTreeMap<String, String> = file
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        for var in JOINER_ENV.iter().chain(ENRICHER_ENV) {
            assert!(env.contains_key(*var), "{var} missing:\n{file}");
        }
        let joiner = JoinerConfig::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(joiner.keyed_stream, "out-KeyedStreamName");
        assert_eq!(joiner.state_log_table, "out-StateLogTableName");
        assert_eq!(env["WARM_WINDOW_SECONDS"], "5000");
        assert_eq!(joiner.warm_window_ms, 5_000_000);
        assert!(
            file.contains("# DEDUP_HORIZON_HOURS: the stack has no parameter DedupHorizonHours")
        );
        assert_eq!(env["DEDUP_HORIZON_HOURS"], "48");
        let enricher = EnricherConfig::from_lookup(|k| env.get(k).cloned()).unwrap();
        assert_eq!(enricher.database, "out-GlueDatabaseName");
    }

    #[test]
    fn only_a_stack_that_does_not_keep_its_data_has_its_buckets_emptied() {
        let mut o = outputs();
        o.insert(LAKE_BUCKET_OUTPUT.into(), "lake".into());
        o.insert("AthenaResultsBucketName".into(), "results".into());
        let mut t = StackTarget::from_outputs("adpipe-dev", &o).unwrap();
        let e = t.disposable_buckets().unwrap_err().to_string();
        assert!(
            e.contains("keeps its data") && e.contains("default, true"),
            "{e}"
        );
        t.parameters.insert("RetainData".into(), "true".into());
        assert!(t.disposable_buckets().is_err());
        t.parameters.insert("RetainData".into(), "false".into());
        assert_eq!(t.disposable_buckets().unwrap(), vec!["lake", "results"]);
    }

    #[test]
    fn a_missing_output_is_named() {
        let mut o = outputs();
        o.remove(CLICKS_STREAM_OUTPUT);
        let e = StackTarget::from_outputs("s", &o).unwrap_err().to_string();
        assert!(e.contains("ClicksStreamName"), "{e}");
        let mut o = outputs();
        o.insert(ON_FAILURE_QUEUE_OUTPUT.into(), String::new());
        assert!(StackTarget::from_outputs("s", &o).is_err());
    }
}
