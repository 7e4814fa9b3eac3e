//! `adpipe status`: what an on-call engineer looks at first. How far behind each function's
//! event source mappings are (Lambda's `IteratorAge`), what is waiting in the on-failure queue
//! (batches Lambda gave up on, for `adpipe redrive`), the dead letters (records refused with a
//! reason), and the last commits of each Iceberg table.
//!
//! Every figure is bounded in cost: metric statistics over the last hour, one queue attribute
//! call, a dead-letter listing that stops at [`MAX_LISTED`] keys, and the newest
//! [`COMMITS_SHOWN`] snapshots of each table's current metadata.

use std::time::{Duration, SystemTime};

use adpipe_core::ports::LakeTable;
use adpipe_lake::IcebergLake;
use aws_sdk_cloudwatch::types::{Dimension, Statistic};
use aws_sdk_sqs::types::QueueAttributeName;
use iceberg::Catalog;

use crate::LocalError;

/// The dead-letter listing stops here (keys are not ordered by time, so counting the last
/// hour's means listing; a larger backlog is reported as "at least").
pub const MAX_LISTED: usize = 10_000;

/// Snapshots shown per table.
pub const COMMITS_SHOWN: usize = 5;

/// The window of the metric statistics and of "recent" dead letters.
pub const WINDOW: Duration = Duration::from_secs(3_600);

/// What `status` looks at.
#[derive(Debug, Clone)]
pub struct StatusTarget {
    /// "stack adpipe-dev" or "local stage".
    pub label: String,
    /// (role, function name): the functions whose `IteratorAge` is read.
    pub functions: Vec<(String, String)>,
    pub on_failure_queue_url: String,
    pub dead_letter_bucket: String,
    pub dead_letter_prefix: String,
    /// The EMF namespace, for the functions' `Rejected` and `Failed` sums (none locally: the
    /// local runner writes the EMF lines to a file, not to CloudWatch).
    pub metrics_namespace: Option<String>,
}

/// One table commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub snapshot_id: i64,
    pub timestamp_ms: i64,
    pub operation: String,
    pub added_records: Option<u64>,
    pub added_files: Option<u64>,
    /// The joined-stream shard whose batch it landed (adpipe's snapshot summary).
    pub input_shard: Option<String>,
}

/// What `status` found.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub label: String,
    /// Per function: the largest `IteratorAge` (ms) of the last hour, if CloudWatch has one.
    pub iterator_age_ms: Vec<(String, Option<f64>)>,
    /// Per function and EMF metric (`Rejected`, `Failed`): the last hour's sum.
    pub emf_sums: Vec<(String, String, Option<f64>)>,
    pub on_failure_messages: u64,
    pub on_failure_in_flight: u64,
    /// Dead-letter objects listed (at most [`MAX_LISTED`]) and those written in the last hour.
    pub dead_letters_listed: usize,
    pub dead_letters_last_hour: usize,
    pub dead_letters_capped: bool,
    /// Per table: its newest commits (newest first), or why they could not be read.
    pub commits: Vec<(String, Result<Vec<Commit>, String>)>,
}

/// Collects the status. `cloudwatch` is `None` where there is no CloudWatch (the local stage).
pub async fn collect(
    target: &StatusTarget,
    sqs: &aws_sdk_sqs::Client,
    s3: &aws_sdk_s3::Client,
    cloudwatch: Option<&aws_sdk_cloudwatch::Client>,
    lake: Option<&IcebergLake>,
) -> Result<Status, LocalError> {
    let now = SystemTime::now();
    let start = now - WINDOW;
    let mut status = Status {
        label: target.label.clone(),
        ..Status::default()
    };
    if let Some(cw) = cloudwatch {
        for (role, function) in &target.functions {
            let age = statistic(
                cw,
                "AWS/Lambda",
                "IteratorAge",
                ("FunctionName", function),
                Statistic::Maximum,
                (start, now),
            )
            .await?;
            status.iterator_age_ms.push((role.clone(), age));
            if let Some(ns) = &target.metrics_namespace {
                for metric in ["Rejected", "Failed"] {
                    let sum = statistic(
                        cw,
                        ns,
                        metric,
                        ("Function", role),
                        Statistic::Sum,
                        (start, now),
                    )
                    .await?;
                    status.emf_sums.push((role.clone(), metric.to_owned(), sum));
                }
            }
        }
    }

    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&target.on_failure_queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .map_err(|e| LocalError::aws("SQS GetQueueAttributes", e))?;
    let attr = |name: QueueAttributeName| {
        attrs
            .attributes()
            .and_then(|a| a.get(&name))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    status.on_failure_messages = attr(QueueAttributeName::ApproximateNumberOfMessages);
    status.on_failure_in_flight = attr(QueueAttributeName::ApproximateNumberOfMessagesNotVisible);

    let mut pages = s3
        .list_objects_v2()
        .bucket(&target.dead_letter_bucket)
        .prefix(&target.dead_letter_prefix)
        .into_paginator()
        .send();
    let recent = aws_smithy_types::DateTime::from(start);
    'listing: while let Some(page) = pages.next().await {
        let page = page.map_err(|e| LocalError::aws("S3 ListObjectsV2", e))?;
        for o in page.contents() {
            if status.dead_letters_listed == MAX_LISTED {
                status.dead_letters_capped = true;
                break 'listing;
            }
            status.dead_letters_listed += 1;
            if o.last_modified().is_some_and(|t| *t >= recent) {
                status.dead_letters_last_hour += 1;
            }
        }
    }

    if let Some(lake) = lake {
        for table in [LakeTable::Clicks, LakeTable::Impressions] {
            let ident = lake.ident(table);
            let commits = match lake.catalog().load_table(&ident).await {
                Ok(t) => Ok(last_commits(t.metadata(), COMMITS_SHOWN)),
                Err(e) => Err(short_error(&e.to_string())),
            };
            status.commits.push((ident.to_string(), commits));
        }
    }
    Ok(status)
}

/// The local stage's status (no CloudWatch there).
pub async fn local(p: &crate::pipeline::Pipeline) -> Result<Status, LocalError> {
    let r = &p.resources;
    let config =
        adpipe_core::config::EnricherConfig::from_lookup(|k| r.enricher.env.get(k).cloned())?;
    let mut lake = adpipe_enricher::lake_config(
        &config,
        Some(p.endpoint.url.clone()),
        Some(r.region.clone()),
    );
    lake.credentials = Some((
        crate::resources::LOCAL_ACCESS_KEY_ID.to_owned(),
        crate::resources::LOCAL_SECRET_ACCESS_KEY.to_owned(),
    ));
    let lease =
        adpipe_lake::DynamoDbCommitLease::new(p.clients.dynamodb.clone(), &r.commit_lease_table);
    let lake = IcebergLake::connect(lake, lease, "adpipe-status".into()).await?;
    let target = StatusTarget {
        label: format!("local stage at {}", p.endpoint.url),
        functions: Vec::new(),
        on_failure_queue_url: p.on_failure_queue_url().await?,
        dead_letter_bucket: config.dead_letter_bucket.clone(),
        dead_letter_prefix: config.dead_letter_prefix.clone(),
        metrics_namespace: None,
    };
    collect(&target, &p.sqs, &p.clients.s3, None, Some(&lake)).await
}

/// A deployed stack's status, with the names from its outputs. `lake_credentials` are static
/// credentials for the Iceberg catalog (a local endpoint); `None` uses the default chain.
pub async fn stack(
    sdk: &aws_config::SdkConfig,
    target: &crate::stack::StackTarget,
    lake_credentials: Option<(String, String)>,
) -> Result<Status, LocalError> {
    use crate::stack::*;
    let bucket = target.output(LAKE_BUCKET_OUTPUT)?.to_owned();
    let lake = adpipe_lake::LakeConfig {
        warehouse: format!("s3://{bucket}/lake"),
        database: target.output(GLUE_DATABASE_OUTPUT)?.to_owned(),
        clicks_table: target.output(CLICKS_TABLE_OUTPUT)?.to_owned(),
        impressions_table: target.output(IMPRESSIONS_TABLE_OUTPUT)?.to_owned(),
        endpoint: sdk.endpoint_url().map(str::to_owned),
        region: sdk.region().map(|r| r.to_string()),
        credentials: lake_credentials,
        row_group_rows: 1,
        max_commit_attempts: 1,
        commit: adpipe_lake::CommitSettings::default(),
    };
    let clients = adpipe_aws::Clients::new(sdk);
    // Reading needs no lease; the lake connection takes one to be built.
    let lease_table = target
        .output(COMMIT_LEASE_TABLE_OUTPUT)
        .unwrap_or("unused")
        .to_owned();
    let lease = adpipe_lake::DynamoDbCommitLease::new(clients.dynamodb.clone(), &lease_table);
    let lake = IcebergLake::connect(lake, lease, "adpipe-status".into()).await?;
    let status_target = StatusTarget {
        label: format!("stack {}", target.stack),
        functions: vec![
            (
                "joiner".into(),
                target.output(JOINER_FUNCTION_OUTPUT)?.to_owned(),
            ),
            (
                "enricher".into(),
                target.output(ENRICHER_FUNCTION_OUTPUT)?.to_owned(),
            ),
        ],
        on_failure_queue_url: target.on_failure_queue_url.clone(),
        dead_letter_bucket: bucket,
        dead_letter_prefix: "dead-letter/".into(),
        metrics_namespace: Some(target.output(METRICS_NAMESPACE_OUTPUT)?.to_owned()),
    };
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let cw = aws_sdk_cloudwatch::Client::new(sdk);
    collect(&status_target, &sqs, &clients.s3, Some(&cw), Some(&lake)).await
}

/// The service's own message out of an SDK error's debug text (iceberg's errors carry the
/// whole response), else the text cut to a line.
pub fn short_error(text: &str) -> String {
    const MARK: &str = "message: Some(\"";
    if let Some(start) = text.find(MARK).map(|i| i + MARK.len()) {
        if let Some(len) = text[start..].find("\")") {
            return text[start..start + len].to_owned();
        }
    }
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The newest `n` snapshots of a table's metadata, newest first.
pub fn last_commits(metadata: &iceberg::spec::TableMetadata, n: usize) -> Vec<Commit> {
    let mut snapshots: Vec<_> = metadata.snapshots().collect();
    snapshots.sort_by_key(|s| std::cmp::Reverse((s.timestamp_ms(), s.sequence_number())));
    snapshots
        .into_iter()
        .take(n)
        .map(|s| {
            let summary = s.summary();
            let number = |key: &str| {
                summary
                    .additional_properties
                    .get(key)
                    .and_then(|v| v.parse().ok())
            };
            Commit {
                snapshot_id: s.snapshot_id(),
                timestamp_ms: s.timestamp_ms(),
                operation: summary.operation.as_str().to_owned(),
                added_records: number("added-records"),
                added_files: number("added-data-files"),
                input_shard: summary
                    .additional_properties
                    .get(adpipe_lake::INPUT_SHARD)
                    .cloned(),
            }
        })
        .collect()
}

async fn statistic(
    cw: &aws_sdk_cloudwatch::Client,
    namespace: &str,
    metric: &str,
    (dimension, value): (&str, &str),
    statistic: Statistic,
    (start, end): (SystemTime, SystemTime),
) -> Result<Option<f64>, LocalError> {
    let out = cw
        .get_metric_statistics()
        .namespace(namespace)
        .metric_name(metric)
        .dimensions(Dimension::builder().name(dimension).value(value).build())
        .start_time(start.into())
        .end_time(end.into())
        .period(WINDOW.as_secs() as i32)
        .statistics(statistic.clone())
        .send()
        .await
        .map_err(|e| LocalError::aws("CloudWatch GetMetricStatistics", e))?;
    let values = out.datapoints().iter().filter_map(|d| match statistic {
        Statistic::Maximum => d.maximum(),
        _ => d.sum(),
    });
    Ok(match statistic {
        Statistic::Maximum => {
            values.fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
        }
        _ => values.fold(None, |s: Option<f64>, v| Some(s.unwrap_or(0.0) + v)),
    })
}

/// The status as the terminal shows it.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "adpipe status: {}", s.label);
    if s.iterator_age_ms.is_empty() {
        let _ = writeln!(
            out,
            "iterator age: not in CloudWatch here (the local runner keeps its own checkpoints; `adpipe run` drains the streams)"
        );
    }
    for (role, age) in &s.iterator_age_ms {
        let _ = match age {
            Some(ms) => writeln!(
                out,
                "iterator age, {role}: {:.1} s (max, last hour)",
                ms / 1000.0
            ),
            None => writeln!(
                out,
                "iterator age, {role}: no data in the last hour (no traffic?)"
            ),
        };
    }
    for (role, metric, sum) in &s.emf_sums {
        let _ = writeln!(
            out,
            "{metric}, {role}: {} (last hour)",
            sum.map_or("no data".to_owned(), |v| format!("{v:.0}"))
        );
    }
    let _ = writeln!(
        out,
        "on-failure queue: {} waiting, {} in flight{}",
        s.on_failure_messages,
        s.on_failure_in_flight,
        if s.on_failure_messages > 0 {
            " (run `adpipe redrive`)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "dead letters: {}{} in all, {} in the last hour",
        if s.dead_letters_capped {
            "at least "
        } else {
            ""
        },
        s.dead_letters_listed,
        s.dead_letters_last_hour
    );
    for (table, commits) in &s.commits {
        match commits {
            Err(e) => {
                let _ = writeln!(out, "table {table}: cannot be read: {e}");
            }
            Ok(c) if c.is_empty() => {
                let _ = writeln!(out, "table {table}: no commits yet");
            }
            Ok(c) => {
                let _ = writeln!(out, "table {table}: last {} commits", c.len());
                for commit in c {
                    let when = chrono::DateTime::from_timestamp_millis(commit.timestamp_ms)
                        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
                        .unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "  {when}  {:<9} snapshot {}  +{} rows in {} files{}",
                        commit.operation,
                        commit.snapshot_id,
                        commit.added_records.unwrap_or(0),
                        commit.added_files.unwrap_or(0),
                        commit
                            .input_shard
                            .as_deref()
                            .map(|s| format!("  (joined-stream {s})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_cut_to_the_services_message() {
        let sdk = r#"Unexpected => aws sdk error: ServiceError(ServiceError { source: EntityNotFoundException(EntityNotFoundException { message: Some("Database adpipe_demo not found."), from_federation_source: None, raw: Response { status: 400 } })"#;
        assert_eq!(short_error(sdk), "Database adpipe_demo not found.");
        assert_eq!(short_error("plain"), "plain");
        assert_eq!(short_error(&"é".repeat(300)).len(), 200);
    }

    #[test]
    fn the_rendering_says_what_to_do_and_admits_a_capped_listing() {
        let s = Status {
            label: "stack adpipe-dev".into(),
            iterator_age_ms: vec![("joiner".into(), Some(1500.0)), ("enricher".into(), None)],
            emf_sums: vec![("joiner".into(), "Rejected".into(), Some(3.0))],
            on_failure_messages: 2,
            on_failure_in_flight: 0,
            dead_letters_listed: MAX_LISTED,
            dead_letters_last_hour: 7,
            dead_letters_capped: true,
            commits: vec![
                ("db.enriched_clicks".into(), Ok(vec![])),
                ("db.impressions".into(), Err("no such table".into())),
            ],
        };
        let text = render(&s);
        assert!(text.contains("iterator age, joiner: 1.5 s"), "{text}");
        assert!(text.contains("iterator age, enricher: no data"), "{text}");
        assert!(text.contains("Rejected, joiner: 3 (last hour)"), "{text}");
        assert!(
            text.contains("2 waiting, 0 in flight (run `adpipe redrive`)"),
            "{text}"
        );
        assert!(
            text.contains("at least 10000 in all, 7 in the last hour"),
            "{text}"
        );
        assert!(
            text.contains("db.enriched_clicks: no commits yet"),
            "{text}"
        );
        assert!(
            text.contains("db.impressions: cannot be read: no such table"),
            "{text}"
        );
    }
}
