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
        StackTarget::from_outputs(stack, &stack_outputs(cfn, stack).await?)
    }
}

impl StackTarget {
    /// The functions' environment against this stack's resources, for
    /// `cargo lambda watch --env-file` (the functions then run on this machine and read and
    /// write the deployed streams, tables and bucket with the default credential chain).
    /// Settings the template leaves at their defaults are left out: the code has the same
    /// defaults (checked by the deploy contract tests).
    pub fn lambda_env_file(&self) -> Result<String, LocalError> {
        use adpipe_core::config as c;
        let bucket = self.output(LAKE_BUCKET_OUTPUT)?;
        let vars: Vec<(&str, String)> = vec![
            (c::IMPRESSIONS_STREAM_NAME, self.impressions_stream.clone()),
            (c::CLICKS_STREAM_NAME, self.clicks_stream.clone()),
            (c::JOINED_STREAM_NAME, self.joined_stream.clone()),
            (
                c::STATE_LOG_TABLE_NAME,
                self.output(STATE_LOG_TABLE_OUTPUT)?.to_owned(),
            ),
            (c::DEAD_LETTER_BUCKET, bucket.to_owned()),
            (c::LAKE_BUCKET, bucket.to_owned()),
            (
                c::GLUE_DATABASE,
                self.output(GLUE_DATABASE_OUTPUT)?.to_owned(),
            ),
            (
                c::CLICKS_TABLE,
                self.output(CLICKS_TABLE_OUTPUT)?.to_owned(),
            ),
            (
                c::IMPRESSIONS_TABLE,
                self.output(IMPRESSIONS_TABLE_OUTPUT)?.to_owned(),
            ),
            (
                c::COMMIT_LEASE_TABLE,
                self.output(COMMIT_LEASE_TABLE_OUTPUT)?.to_owned(),
            ),
            (
                c::METRICS_NAMESPACE,
                self.output(METRICS_NAMESPACE_OUTPUT)?.to_owned(),
            ),
        ];
        let mut out = format!(
            "# Written by `adpipe --stack {} env`: the functions' environment against the \
             deployed stack's resources.\n",
            self.stack
        );
        if let Some(region) = self.outputs.get("Region") {
            out.push_str(&format!("AWS_REGION={region}\n"));
        }
        for (k, v) in vars {
            out.push_str(&format!("{k}={v}\n"));
        }
        Ok(out)
    }
}

/// The outputs of one stack, key → value.
pub async fn stack_outputs(
    cfn: &aws_sdk_cloudformation::Client,
    stack: &str,
) -> Result<BTreeMap<String, String>, LocalError> {
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
    Ok(found
        .outputs()
        .iter()
        .filter_map(|o| Some((o.output_key()?.to_owned(), o.output_value()?.to_owned())))
        .collect())
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
            }
        );
        assert_eq!(t.output("DashboardName").unwrap(), "d");
        let e = t.output(WORKGROUP_OUTPUT).unwrap_err().to_string();
        assert!(e.contains("AthenaWorkGroupName"), "{e}");
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
