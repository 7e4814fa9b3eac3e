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

/// What `generate`, `replay` and `redrive` act on in a deployed stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackTarget {
    pub stack: String,
    pub impressions_stream: String,
    pub clicks_stream: String,
    pub joined_stream: String,
    /// The mappings' on-failure destination (pointers to the batches Lambda gave up on).
    pub on_failure_queue_url: String,
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
        .map_err(|e| LocalError::aws("CloudFormation DescribeStacks", e))?;
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
            }
        );
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
