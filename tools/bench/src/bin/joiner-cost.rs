//! Joiner cost per input event, counted from the real requests the AWS SDK sends to the local
//! endpoint: DynamoDB requests and write/read units, Kinesis `PutRecords`, S3 `PutObject`.
//!
//! Usage: cargo run --release -p adpipe-bench --bin joiner-cost -- \
//!          [--impressions 20000] [--ctr 0.02] [--batch 100] [--duplicates 0.0] [--seed 7]
//!
//! Write units follow DynamoDB's rule (larger of the item before and after, 1 KB units),
//! computed by the adapter from the real items, because local endpoints do not report them.

use adpipe_aws::{Clients, RequestCounter};
use adpipe_core::config::JoinerConfig;
use adpipe_core::metrics::Counts;
use adpipe_core::testkit::{Scenario, ScenarioSize, ShardPoller};
use adpipe_it::{create_bucket, create_state_table, create_stream, read_stream, unique, LocalAws};
use adpipe_local::cli::share;
use clap::Parser;
use std::sync::atomic::Ordering;

/// Joiner cost per input event, from the requests the AWS SDK sends to the local endpoint.
#[derive(Debug, Parser)]
#[command(name = "joiner-cost")]
struct Args {
    /// Impressions in the scenario
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    impressions: usize,
    /// Click-through rate
    #[arg(long, value_name = "P", default_value_t = 0.02, value_parser = share)]
    ctr: f64,
    /// Records per batch (the mapping's batch size)
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Share of deliveries sent twice
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = share)]
    duplicates: f64,
    /// Seed of the scenario
    #[arg(long, value_name = "N", default_value_t = 7)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        impressions,
        ctr,
        batch,
        duplicates,
        seed,
    } = Args::parse();
    let batch = batch as usize;

    let local = LocalAws::shared();
    let sdk = local.sdk_config().await;
    let setup = Clients::new(&sdk);
    let (table, joined_stream, bucket) = (
        unique("cost-state"),
        unique("cost-joined"),
        unique("cost-dlq"),
    );
    create_state_table(&setup, &table).await?;
    create_stream(&setup, &joined_stream, 1).await?;
    create_bucket(&setup, &bucket).await?;
    let vars = [
        ("IMPRESSIONS_STREAM_NAME", "impressions".to_owned()),
        ("CLICKS_STREAM_NAME", "clicks".to_owned()),
        ("JOINED_STREAM_NAME", joined_stream.clone()),
        ("STATE_TABLE_NAME", table),
        ("DEAD_LETTER_BUCKET", bucket),
    ];
    let config =
        JoinerConfig::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))?;

    let counter = RequestCounter::default();
    let clients = Clients::metered(&sdk, &counter);
    let joiner = adpipe_joiner::aws_joiner(&clients, config);

    let clicks = (impressions as f64 * ctr).round() as usize;
    let scenario = Scenario::generate(
        seed,
        ScenarioSize {
            impressions,
            clicks,
            duplicate_rate: duplicates,
        },
        "",
    );
    let events = scenario.impression_stream.len() + scenario.click_stream.len();
    eprintln!("joiner-cost: {impressions} impressions, {clicks} clicks, {events} deliveries, batch {batch}");
    let mut pollers = [
        ShardPoller::new(
            "impressions",
            "shardId-000000000000",
            scenario.impression_stream.clone(),
        ),
        ShardPoller::new(
            "clicks",
            "shardId-000000000000",
            scenario.click_stream.clone(),
        ),
    ];
    let mut totals = Counts::default();
    let mut now_ms = 1_795_169_800_000i64;
    let mut done = 0usize;
    // Both streams' batches alternate, clicks interleaved with impressions as in production.
    while pollers.iter().any(|p| !p.drained()) {
        for p in pollers.iter_mut().filter(|p| !p.drained()) {
            let records = p.next_batch(batch);
            now_ms += 100;
            let report = joiner.process(&records, now_ms).await;
            p.checkpoint(records.len(), report.first_failure);
            add(&mut totals, &report.counts);
            done += records.len();
        }
        if done % 5_000 < batch * 2 {
            eprintln!("  {done}/{events} records");
        }
    }

    let usage = &joiner.state.usage;
    let wcu = usage.write_units.load(Ordering::Relaxed);
    let rcu = usage.read_units.load(Ordering::Relaxed);
    let per_event = |n: u64| n as f64 / events as f64;
    println!(
        "## joiner cost, {events} input events (ctr {ctr}, batch {batch}, duplicates {duplicates})"
    );
    println!(
        "joined pairs: {}, buffered: {}, duplicates ignored: {}, unmatched: {}",
        totals.joined, totals.buffered, totals.duplicates, totals.unmatched
    );
    println!("| measure | total | per input event | per 1,000 events |");
    println!("|---|---|---|---|");
    println!(
        "| DynamoDB write units | {wcu} | {:.4} | {:.1} |",
        per_event(wcu),
        per_event(wcu) * 1000.0
    );
    println!(
        "| DynamoDB read units | {rcu} | {:.4} | {:.1} |",
        per_event(rcu),
        per_event(rcu) * 1000.0
    );
    for ((service, op), n) in counter.snapshot() {
        println!(
            "| {service} {op} requests | {n} | {:.4} | {:.1} |",
            per_event(n),
            per_event(n) * 1000.0
        );
    }
    let total = counter.total();
    println!(
        "| all AWS API calls | {total} | {:.4} | {:.1} |",
        per_event(total),
        per_event(total) * 1000.0
    );
    // Kinesis PUT payload units the joiner puts (its output stream; the producers' own puts of
    // the input events are the same for any design and not counted): one per started 25 KiB.
    let ddb: u64 = counter
        .snapshot()
        .into_iter()
        .filter(|((service, _), _)| service.eq_ignore_ascii_case("dynamodb"))
        .map(|(_, n)| n)
        .sum();
    let output = read_stream(&setup, &joined_stream).await?;
    let put_units: u64 = output.iter().map(|r| put_payload_units(r.len())).sum();
    println!(
        "joiner output: {} records, {} bytes, {put_units} PUT payload units",
        output.len(),
        output.iter().map(Vec::len).sum::<usize>()
    );
    println!("{}", summary_line(events as u64, wcu, rcu, ddb, put_units));
    Ok(())
}

/// Kinesis bills PUTs in payload units of 25 KiB, each record at least one.
fn put_payload_units(bytes: usize) -> u64 {
    bytes.div_ceil(25 * 1024).max(1) as u64
}

/// The benchmark's last line.
fn summary_line(events: u64, wcu: u64, rcu: u64, ddb_requests: u64, put_units: u64) -> String {
    let per = |n: u64| n as f64 / events.max(1) as f64;
    format!(
        "joiner-cost: events={events} write_units_per_event={:.3} read_units_per_event={:.3} \
         ddb_requests_per_1000={:.1} put_units_per_event={:.3}",
        per(wcu),
        per(rcu),
        per(ddb_requests) * 1000.0,
        per(put_units)
    )
}

fn add(t: &mut Counts, c: &Counts) {
    t.joined += c.joined;
    t.buffered += c.buffered;
    t.duplicates += c.duplicates;
    t.unmatched += c.unmatched;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_last_line_has_the_issues_fields_and_put_units_round_up() {
        assert_eq!(
            summary_line(20_000, 20_320, 0, 20_260, 400),
            "joiner-cost: events=20000 write_units_per_event=1.016 read_units_per_event=0.000 \
             ddb_requests_per_1000=1013.0 put_units_per_event=0.020"
        );
        assert_eq!(put_payload_units(1), 1);
        assert_eq!(put_payload_units(25 * 1024), 1);
        assert_eq!(put_payload_units(25 * 1024 + 1), 2);
    }

    #[test]
    fn options_parse_with_their_defaults_and_refuse_typos_and_bad_values() {
        Args::command().debug_assert();
        let a = Args::try_parse_from(["joiner-cost"]).expect("defaults");
        assert!(
            a.impressions == 20_000
                && a.ctr == 0.02
                && a.batch == 100
                && a.duplicates == 0.0
                && a.seed == 7,
            "{a:?}"
        );
        let a = Args::try_parse_from(["joiner-cost", "--batch", "10", "--duplicates", "0.1"])
            .expect("options");
        assert!(a.batch == 10 && a.duplicates == 0.1, "{a:?}");
        for args in [
            &["joiner-cost", "--batch-size", "10"][..],
            &["joiner-cost", "--batch", "ten"][..],
            &["joiner-cost", "--duplicates", "-0.1"][..],
        ] {
            assert!(Args::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
