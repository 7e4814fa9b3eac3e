//! `adpipe events`: the sample Lambda events of `events/` for any stage.
//!
//! The joiner tells its two inputs apart by the stream name in each record's `eventSourceARN`,
//! so a fixture names one stage's streams: `events/` in the repository name the local stage's
//! (`adpipe-local-*`, account 123456789012, us-east-1), which a deployed stack would
//! dead-letter as `unknown_source`. This module renders the same fixtures (records, payloads,
//! sequence numbers and timestamps unchanged) for another stage: each record's stream ARN,
//! region and invoking role become the target's. The content has one source,
//! `tools/make_events.py`, which writes `events/`; rendering them for the local stage gives
//! them back byte for byte (a test checks it), so there is one generator, and this is its
//! projection onto a stage.
//!
//! The files are rewritten as text, field by field, so everything but the names keeps its
//! exact bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::LocalError;

/// The fixtures, as the repository has them (the local stage's), compiled in so that an
/// installed `adpipe` renders them anywhere.
pub const FIXTURES: &[(&str, &str)] = &[
    (
        "impressions.json",
        include_str!("../../../events/impressions.json"),
    ),
    ("clicks.json", include_str!("../../../events/clicks.json")),
    (
        "malformed.json",
        include_str!("../../../events/malformed.json"),
    ),
    ("joined.json", include_str!("../../../events/joined.json")),
    (
        "hostile-impressions.json",
        include_str!("../../../events/hostile-impressions.json"),
    ),
    (
        "hostile-clicks.json",
        include_str!("../../../events/hostile-clicks.json"),
    ),
];

/// Which of the pipeline's streams a record comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StreamRole {
    Impressions,
    Clicks,
    Joined,
}

impl StreamRole {
    /// The role of a stream by its name's suffix, as every stage names them
    /// (`adpipe-<stage>-impressions`, ...).
    pub fn of_stream(name: &str) -> Option<StreamRole> {
        if name.ends_with("-impressions") {
            Some(StreamRole::Impressions)
        } else if name.ends_with("-clicks") {
            Some(StreamRole::Clicks)
        } else if name.ends_with("-joined") {
            Some(StreamRole::Joined)
        } else {
            None
        }
    }
}

/// A stage's names, as the events carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageNames {
    pub region: String,
    /// Stream ARN per role.
    pub streams: BTreeMap<StreamRole, String>,
    /// The role ARN a mapping invokes its function with, per input stream role.
    pub invoke_roles: BTreeMap<StreamRole, String>,
}

impl StageNames {
    /// The local stage: what `events/` in the repository name.
    pub fn local() -> StageNames {
        let (region, account) = ("us-east-1", "123456789012");
        let stream =
            |n: &str| format!("arn:aws:kinesis:{region}:{account}:stream/adpipe-local-{n}");
        let joiner_role = format!("arn:aws:iam::{account}:role/adpipe-local-joiner");
        StageNames {
            region: region.to_owned(),
            streams: [
                (StreamRole::Impressions, stream("impressions")),
                (StreamRole::Clicks, stream("clicks")),
                (StreamRole::Joined, stream("joined")),
            ]
            .into(),
            invoke_roles: [
                (StreamRole::Impressions, joiner_role.clone()),
                (StreamRole::Clicks, joiner_role.clone()),
                (StreamRole::Joined, joiner_role),
            ]
            .into(),
        }
    }

    /// A deployed stack's names, from its stream ARNs (region and account come from them) and,
    /// when the stack has them, its functions' role ARNs.
    pub fn from_stream_arns(
        impressions: &str,
        clicks: &str,
        joined: &str,
        joiner_role: Option<&str>,
        enricher_role: Option<&str>,
    ) -> Result<StageNames, LocalError> {
        let parts = |arn: &str| -> Result<(String, String), LocalError> {
            let fields: Vec<&str> = arn.splitn(6, ':').collect();
            match fields.as_slice() {
                ["arn", _, "kinesis", region, account, rest] if rest.starts_with("stream/") => {
                    Ok(((*region).to_owned(), (*account).to_owned()))
                }
                _ => Err(LocalError::Stack(format!(
                    "{arn:?} is not a Kinesis stream ARN"
                ))),
            }
        };
        let (region, account) = parts(impressions)?;
        for other in [clicks, joined] {
            if parts(other)? != (region.clone(), account.clone()) {
                return Err(LocalError::Stack(format!(
                    "{other} is not in the region and account of {impressions}"
                )));
            }
        }
        // Without role outputs (a stack of an older template), a role of the right account.
        let fallback = format!("arn:aws:iam::{account}:role/adpipe-invoke");
        let joiner_role = joiner_role.map_or(fallback.clone(), str::to_owned);
        let enricher_role = enricher_role.map_or(fallback, str::to_owned);
        Ok(StageNames {
            region,
            streams: [
                (StreamRole::Impressions, impressions.to_owned()),
                (StreamRole::Clicks, clicks.to_owned()),
                (StreamRole::Joined, joined.to_owned()),
            ]
            .into(),
            invoke_roles: [
                (StreamRole::Impressions, joiner_role.clone()),
                (StreamRole::Clicks, joiner_role),
                (StreamRole::Joined, enricher_role),
            ]
            .into(),
        })
    }
}

/// Replaces the JSON string value of `"field": "old"` everywhere in `text`.
fn replace_field(text: &str, field: &str, old: &str, new: &str) -> String {
    let quote = |v: &str| Value::String(v.to_owned()).to_string();
    text.replace(
        &format!("\"{field}\": {}", quote(old)),
        &format!("\"{field}\": {}", quote(new)),
    )
}

/// One fixture rendered for `target`. Every record must come from one of the three streams.
pub fn render(name: &str, text: &str, target: &StageNames) -> Result<String, LocalError> {
    let event: Value = serde_json::from_str(text)
        .map_err(|e| LocalError::Stack(format!("{name}: not JSON: {e}")))?;
    let records = event["Records"]
        .as_array()
        .ok_or_else(|| LocalError::Stack(format!("{name}: no Records array")))?;
    let mut out = text.to_owned();
    let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
    for r in records {
        let field = |f: &str| r[f].as_str().unwrap_or_default().to_owned();
        let arn = field("eventSourceARN");
        let stream = adpipe_core::config::stream_name(&arn);
        let role = StreamRole::of_stream(stream).ok_or_else(|| {
            LocalError::Stack(format!("{name}: record of an unknown stream {arn:?}"))
        })?;
        seen.insert(
            ("eventSourceARN".into(), arn),
            target.streams[&role].clone(),
        );
        seen.insert(
            ("awsRegion".into(), field("awsRegion")),
            target.region.clone(),
        );
        seen.insert(
            ("invokeIdentityArn".into(), field("invokeIdentityArn")),
            target.invoke_roles[&role].clone(),
        );
    }
    // Longest first, so that no value is replaced inside a longer one already replaced.
    let mut replacements: Vec<_> = seen.into_iter().collect();
    replacements.sort_by_key(|((_, old), _)| std::cmp::Reverse(old.len()));
    for ((field, old), new) in replacements {
        out = replace_field(&out, &field, &old, &new);
    }
    Ok(out)
}

/// Writes every fixture rendered for `target` into `dir`; returns the paths written.
pub fn write_all(dir: &Path, target: &StageNames) -> Result<Vec<PathBuf>, LocalError> {
    std::fs::create_dir_all(dir).map_err(LocalError::io("creating the events directory"))?;
    let mut written = Vec::new();
    for (name, text) in FIXTURES {
        let path = dir.join(name);
        std::fs::write(&path, render(name, text, target)?)
            .map_err(LocalError::io("writing an event file"))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> StageNames {
        let arn = |n: &str| format!("arn:aws:kinesis:eu-west-1:210987654321:stream/adpipe-dev-{n}");
        StageNames::from_stream_arns(
            &arn("impressions"),
            &arn("clicks"),
            &arn("joined"),
            Some("arn:aws:iam::210987654321:role/adpipe-dev-joiner"),
            None,
        )
        .unwrap()
    }

    #[test]
    fn the_local_stage_gets_the_repository_files_back_byte_for_byte() {
        for (name, text) in FIXTURES {
            assert_eq!(
                &render(name, text, &StageNames::local()).unwrap(),
                text,
                "{name}"
            );
        }
    }

    #[test]
    fn another_stage_gets_its_names_and_nothing_else_changes() {
        for (name, text) in FIXTURES {
            let rendered = render(name, text, &dev()).unwrap();
            assert!(!rendered.contains("adpipe-local"), "{name}");
            assert!(!rendered.contains(":123456789012:"), "{name}");
            let (a, b): (Value, Value) = (
                serde_json::from_str(text).unwrap(),
                serde_json::from_str(&rendered).unwrap(),
            );
            let (ra, rb) = (
                a["Records"].as_array().unwrap(),
                b["Records"].as_array().unwrap(),
            );
            assert_eq!(ra.len(), rb.len());
            for (x, y) in ra.iter().zip(rb) {
                assert_eq!(x["kinesis"], y["kinesis"], "{name}: payload unchanged");
                assert_eq!(y["awsRegion"], "eu-west-1");
                let stream = x["eventSourceARN"]
                    .as_str()
                    .unwrap()
                    .replace("-local-", "-dev-");
                let stream = stream.replace("us-east-1:123456789012", "eu-west-1:210987654321");
                assert_eq!(y["eventSourceARN"], stream.as_str());
            }
        }
    }

    #[test]
    fn stream_arns_must_be_kinesis_arns_of_one_account() {
        let ok = "arn:aws:kinesis:eu-west-1:1:stream/a-impressions";
        assert!(StageNames::from_stream_arns(ok, "not-an-arn", ok, None, None).is_err());
        let other = "arn:aws:kinesis:us-east-1:1:stream/a-clicks";
        assert!(StageNames::from_stream_arns(ok, other, ok, None, None).is_err());
    }
}
