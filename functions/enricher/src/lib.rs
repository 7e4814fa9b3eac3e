//! The enricher Lambda's thin edge: joined-stream event in, core enrichment, lake appends,
//! batch response out.

use adpipe_aws::{Clients, S3DeadLetterSink};
use adpipe_core::config::EnricherConfig;
use adpipe_core::enricher::{BatchEnricher, EnrichReport, EnricherSettings, FUNCTION};
use adpipe_core::metrics::{emf_values, Invocation};
use adpipe_core::ports::{DeadLetterSink, PortError, TableWriter};
use adpipe_lake::{DynamoDbCommitLease, IcebergLake, LakeConfig};
use adpipe_lambda::{batch_response, input_records, KinesisInput};
use aws_lambda_events::event::streams::KinesisEventResponse;

/// The enricher wired to AWS.
pub type AwsEnricher = BatchEnricher<IcebergLake, S3DeadLetterSink>;

/// Parquet row-group size: one Lambda batch (≤ 6 MB of JSON) fits in a handful.
pub const ROW_GROUP_ROWS: usize = 100_000;

/// The lake settings from the enricher's configuration.
pub fn lake_config(
    config: &EnricherConfig,
    endpoint: Option<String>,
    region: Option<String>,
) -> LakeConfig {
    LakeConfig::of_tables(&config.tables(), endpoint, region, ROW_GROUP_ROWS)
}

/// Builds the enricher (once per execution environment) and makes sure the tables exist.
pub async fn aws_enricher(
    clients: &Clients,
    config: EnricherConfig,
    lake: LakeConfig,
    owner: String,
) -> Result<AwsEnricher, PortError> {
    let lease = DynamoDbCommitLease::new(clients.dynamodb.clone(), &config.commit_lease_table);
    let lake = IcebergLake::connect(lake, lease, owner).await?;
    lake.ensure_tables(&clients.s3).await?;
    Ok(BatchEnricher::new(
        lake,
        S3DeadLetterSink::new(clients.s3.clone(), &config.dead_letter_bucket),
        EnricherSettings {
            rules: config.rules,
            dead_letter_prefix: config.dead_letter_prefix,
            max_in_flight: 32,
            time_bounds: config.time_bounds,
            max_days_per_batch: config.max_days_per_batch,
        },
    ))
}

/// The per-batch EMF line of the enricher.
pub fn metrics_line(
    namespace: &str,
    report: &EnrichReport,
    now_ms: i64,
    invocation: &Invocation,
) -> String {
    let c = &report.counts;
    let mut values: Vec<(String, u64)> = vec![
        ("RecordsIn".into(), c.records_in),
        ("Clicks".into(), c.clicks),
        ("Impressions".into(), c.impressions),
        (
            "RowsWritten".into(),
            report.clicks.rows_written + report.impressions.rows_written,
        ),
        ("DuplicatesDropped".into(), c.duplicates),
        ("Rejected".into(), c.rejected_total()),
        (
            "FilesWritten".into(),
            report.clicks.files_written + report.impressions.files_written,
        ),
        (
            "BytesWritten".into(),
            report.clicks.bytes_written + report.impressions.bytes_written,
        ),
        (
            "CommitRetries".into(),
            u64::from(report.clicks.commit_retries + report.impressions.commit_retries),
        ),
        (
            "ForeignColumns".into(),
            report.clicks.foreign_columns + report.impressions.foreign_columns,
        ),
        (
            "MetadataFilesDeleted".into(),
            report.clicks.metadata_deleted + report.impressions.metadata_deleted,
        ),
        (
            "SnapshotsExpiredEarly".into(),
            report.clicks.snapshots_expired_early + report.impressions.snapshots_expired_early,
        ),
        ("Failed".into(), c.failed),
    ];
    for (reason, n) in &c.rejected {
        values.push((format!("Rejected.{}", reason.as_str()), *n));
    }
    emf_values(namespace, FUNCTION, &values, now_ms, invocation)
}

/// Handles one invocation. On failure the whole batch is reported (its first record): each
/// table's append is idempotent per input range, so the redelivery completes it.
pub async fn handle<T: TableWriter, D: DeadLetterSink>(
    enricher: &BatchEnricher<T, D>,
    namespace: &str,
    event: &impl KinesisInput,
    now_ms: i64,
) -> (KinesisEventResponse, EnrichReport) {
    handle_invocation(enricher, namespace, event, now_ms, &Invocation::default()).await
}

/// [`handle`] for a known invocation (request id, cold start), which its EMF line carries.
pub async fn handle_invocation<T: TableWriter, D: DeadLetterSink>(
    enricher: &BatchEnricher<T, D>,
    namespace: &str,
    event: &impl KinesisInput,
    now_ms: i64,
    invocation: &Invocation,
) -> (KinesisEventResponse, EnrichReport) {
    let records = input_records(event);
    let report = enricher.process(&records, now_ms).await;
    println!("{}", metrics_line(namespace, &report, now_ms, invocation));
    tracing::info!(
        records = report.counts.records_in,
        rows = report.clicks.rows_written + report.impressions.rows_written,
        failed = report.failed.is_some(),
        "batch processed"
    );
    let first = report.failed.as_ref().map(|_| 0);
    (batch_response(event, first), report)
}
