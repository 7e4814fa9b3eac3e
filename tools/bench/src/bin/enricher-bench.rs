//! Enricher throughput and memory for Lambda's largest batches.
//!
//! Usage: cargo build --release --workspace && ./target/release/enricher-bench [--records N] [--click-share 0.02] [--rounds 5]
//!
//! 1. CPU path (in process, no I/O): decode + validate + enrich + Arrow + Parquet (zstd) for one
//!    batch, repeated `--rounds` times; reports rows/s per core (median round).
//! 2. End to end against the local endpoint: one batch through the real enricher (Parquet to S3,
//!    Iceberg commits in Glue); reports files and bytes written and the process's peak RSS.

use std::time::Instant;

use adpipe_bench::{encode_parquet, enriched_batches, joined_records, peak_rss_mib};
use adpipe_enricher::ROW_GROUP_ROWS;
use adpipe_lake::writer_properties;
use adpipe_local::cli::share;
use aws_lambda_events::event::kinesis::KinesisEvent;
use clap::Parser;

/// Enricher throughput (CPU path) and memory (end to end on the local endpoint) for one batch.
#[derive(Debug, Parser)]
#[command(name = "enricher-bench")]
struct Args {
    /// Records in the batch
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    records: u32,
    /// Share of the records that are attributed clicks
    #[arg(long, value_name = "P", default_value_t = 0.02, value_parser = share)]
    click_share: f64,
    /// Rounds of the CPU path (the figure is their median)
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

/// The CPU path of one batch; returns Parquet bytes produced.
fn cpu_path(data: &[Vec<u8>]) -> anyhow::Result<usize> {
    let (clicks, impressions) = enriched_batches(data)?;
    let props = writer_properties(ROW_GROUP_ROWS);
    Ok(encode_parquet(&clicks, &props)?.len() + encode_parquet(&impressions, &props)?.len())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.records as usize;
    let click_share = args.click_share;
    let rounds = args.rounds as usize;
    let data = joined_records(n, click_share);
    let payload: usize = data.iter().map(Vec::len).sum();
    println!(
        "## enricher, one batch of {n} records ({:.2} MiB of JSON, click share {click_share})",
        payload as f64 / 1048576.0
    );

    let mut rates = Vec::new();
    let mut parquet_bytes = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        parquet_bytes = cpu_path(&data)?;
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    println!("CPU path (decode+enrich+Arrow+Parquet zstd), rows/s on one core: median {:.0} (min {:.0}, max {:.0}, {rounds} rounds)", rates[rates.len() / 2], rates[0], rates[rates.len() - 1]);
    println!(
        "Parquet bytes for the batch: {parquet_bytes} ({:.1}x smaller than the JSON)",
        payload as f64 / parquet_bytes as f64
    );
    let rss_cpu = peak_rss_mib();

    // End to end through the real enricher against the local endpoint.
    use adpipe_aws::Clients;
    use adpipe_it::{create_bucket, create_lease_table, unique, LocalAws};
    let local = LocalAws::shared();
    let clients = Clients::new(&local.sdk_config().await);
    let (bucket, lease, db) = (
        unique("bench-lake"),
        unique("bench-lease"),
        unique("bench").replace('-', "_"),
    );
    create_bucket(&clients, &bucket).await?;
    create_lease_table(&clients, &lease).await?;
    let vars = [
        ("JOINED_STREAM_NAME", "joined".to_owned()),
        ("LAKE_BUCKET", bucket.clone()),
        ("GLUE_DATABASE", db),
        ("COMMIT_LEASE_TABLE", lease),
        ("DEAD_LETTER_BUCKET", bucket),
    ];
    let config = adpipe_core::config::EnricherConfig::from_lookup(|k| {
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })?;
    let mut lake = adpipe_enricher::lake_config(
        &config,
        Some(local.endpoint.clone()),
        Some("us-east-1".into()),
    );
    lake.credentials = Some(("test".into(), "test".into()));
    let enricher = adpipe_enricher::aws_enricher(&clients, config, lake, "bench".into())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let event = kinesis_event(&data);
    let t = Instant::now();
    let (response, report) =
        adpipe_enricher::handle(&enricher, "adpipe", &event, 1_795_219_200_000).await;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        response.batch_item_failures.is_empty(),
        "batch failed: {:?}",
        report.failed
    );
    let files = report.clicks.files_written + report.impressions.files_written;
    let bytes = report.clicks.bytes_written + report.impressions.bytes_written;
    let rows = report.clicks.rows_written + report.impressions.rows_written;
    println!("end to end (local endpoint): {rows} rows, {files} data files, {bytes} bytes of Parquet, {:.0} rows/s (dominated by the local endpoint)", rows as f64 / secs);
    println!("peak RSS: {rss_cpu:.1} MiB after the CPU rounds, {:.1} MiB after the end-to-end batch (whole bench process)", peak_rss_mib());
    Ok(())
}

fn kinesis_event(data: &[Vec<u8>]) -> KinesisEvent {
    use base64::Engine;
    let records: Vec<serde_json::Value> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let seq = format!("4965685346523545711234567890{i:022}");
            serde_json::json!({
                "kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": "p", "sequenceNumber": seq,
                    "data": base64::engine::general_purpose::STANDARD.encode(d), "approximateArrivalTimestamp": 1795169730.5},
                "eventSource": "aws:kinesis", "eventVersion": "1.0", "eventID": format!("shardId-000000000000:{seq}"),
                "eventName": "aws:kinesis:record", "awsRegion": "us-east-1",
                "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/joined"
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({ "Records": records })).expect("a Kinesis event")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn options_parse_with_their_defaults_and_refuse_typos_and_bad_values() {
        Args::command().debug_assert();
        let a = Args::try_parse_from(["enricher-bench"]).expect("defaults");
        assert!(
            a.records == 10_000 && a.click_share == 0.02 && a.rounds == 5,
            "{a:?}"
        );
        let a =
            Args::try_parse_from(["enricher-bench", "--records", "100", "--click-share", "0.5"])
                .expect("options");
        assert!(a.records == 100 && a.click_share == 0.5, "{a:?}");
        for args in [
            &["enricher-bench", "--record", "100"][..],
            &["enricher-bench", "--records", "1e4"][..],
            &["enricher-bench", "--click-share", "1.5"][..],
        ] {
            assert!(Args::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
