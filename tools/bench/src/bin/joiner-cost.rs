//! Joiner cost per input event, counted from the real requests the AWS SDK sends to the local
//! endpoint, over the whole path from the input streams to the joined stream: the router
//! (input streams to the keyed stream) and the keyed joiner (keyed stream to the joined
//! stream, its state a log of compressed slots in DynamoDB).
//!
//! Usage: cargo run --release -p adpipe-bench --bin joiner-cost -- \
//!          [--impressions 20000] [--ctr 0.02] [--batch 100] [--keyed-batch 100] \
//!          [--duplicates 0.0] [--keyed-shards 1] [--restarts 1] [--seed 7]
//!
//! Write and read units follow DynamoDB's rules (a put is its item in 1 KB units, a strongly
//! consistent query page its items in 4 KB units), computed by the adapter from the real items,
//! because local endpoints do not report them. `--restarts` replaces the joiner's execution
//! environment that many times, evenly spread, so the cost of rebuilding the state from the
//! log is in the figures.

use std::collections::BTreeMap;

use adpipe_aws::{Clients, RequestCounter};
use adpipe_core::config::JoinerConfig;
use adpipe_core::metrics::Counts;
use adpipe_core::testkit::{Scenario, ScenarioSize, ShardPoller};
use adpipe_it::{
    create_bucket, create_log_table, create_stream, read_records, read_stream, unique, LocalAws,
};
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
    /// Records per batch of an input stream (the routing mappings' batch size)
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Records per batch of the keyed stream (the join mapping's batch size)
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    keyed_batch: u32,
    /// Shards of the keyed stream
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    keyed_shards: u32,
    /// Times the joiner's execution environment is replaced (its state rebuilt from the log)
    #[arg(long, value_name = "N", default_value_t = 1)]
    restarts: u32,
    /// Share of deliveries sent twice
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = share)]
    duplicates: f64,
    /// Seed of the scenario
    #[arg(long, value_name = "N", default_value_t = 7)]
    seed: u64,
    /// Short sequential ids (imp-1, clk-1) instead of random UUIDs: they compress far better
    /// than real ids, so the default is UUIDs
    #[arg(long)]
    sequential_ids: bool,
    /// The join state's warm window in seconds (`WARM_WINDOW_SECONDS`; default: the
    /// template's). With it the clock lead is set to 1 s, which the traffic (event times 5 to
    /// 15 minutes before arrival) respects, so once entries leave memory every event is late
    /// and decided after reading the cold pages: the worst case for reads, and a check that
    /// memory stays bounded
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(32..))]
    warm_window_s: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        impressions,
        ctr,
        batch,
        keyed_batch,
        keyed_shards,
        restarts,
        duplicates,
        seed,
        sequential_ids,
        warm_window_s,
    } = Args::parse();
    let batch = batch as usize;

    let local = LocalAws::shared();
    let sdk = local.sdk_config().await;
    let setup = Clients::new(&sdk);
    let (log_table, keyed_stream, joined_stream, bucket) = (
        unique("cost-log"),
        unique("cost-keyed"),
        unique("cost-joined"),
        unique("cost-dlq"),
    );
    create_log_table(&setup, &log_table).await?;
    create_stream(&setup, &keyed_stream, keyed_shards as i32).await?;
    create_stream(&setup, &joined_stream, 1).await?;
    create_bucket(&setup, &bucket).await?;
    let mut vars = vec![
        ("IMPRESSIONS_STREAM_NAME", "impressions".to_owned()),
        ("CLICKS_STREAM_NAME", "clicks".to_owned()),
        ("JOINED_STREAM_NAME", joined_stream.clone()),
        ("KEYED_STREAM_NAME", keyed_stream.clone()),
        ("STATE_LOG_TABLE_NAME", log_table),
        ("DEAD_LETTER_BUCKET", bucket),
    ];
    if let Some(w) = warm_window_s {
        vars.push(("WARM_WINDOW_SECONDS", w.to_string()));
        vars.push(("MAX_EVENT_TIME_AHEAD_SECONDS", "1".to_owned()));
    }
    let config =
        JoinerConfig::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))?;
    let rules = config.rules;

    let counter = RequestCounter::default();
    let clients = Clients::metered(&sdk, &counter);
    let function = adpipe_joiner::aws_function(&clients, config);

    let clicks = (impressions as f64 * ctr).round() as usize;
    // Event times from a few minutes ago: the keyed stream's arrival times are the endpoint's
    // clock, and the joiner refuses events older than its deduplication horizon.
    let scenario = Scenario::generate_at(
        seed,
        ScenarioSize {
            impressions,
            clicks,
            duplicate_rate: duplicates,
        },
        "",
        adpipe_lambda::now_ms() - 15 * 60 * 1000,
        !sequential_ids,
    );
    let events = scenario.impression_stream.len() + scenario.click_stream.len();
    eprintln!(
        "joiner-cost: {impressions} impressions, {clicks} clicks, {events} deliveries, \
         batch {batch}, keyed batch {keyed_batch}, {keyed_shards} keyed shards, {restarts} restarts"
    );
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
    let mut keyed_done: BTreeMap<String, String> = BTreeMap::new();
    let restart_every = (events / (restarts as usize + 1)).max(1);
    let mut next_restart = restart_every;
    let mut restarted = 0;
    let mut peak = 0usize;
    // Both streams' batches alternate, clicks interleaved with impressions as in production;
    // the keyed stream is drained after each round, shard by shard, as its mapping would.
    loop {
        for p in pollers.iter_mut().filter(|p| !p.drained()) {
            let records = p.next_batch(batch);
            now_ms += 100;
            let report = function.router.process(&records, now_ms).await;
            p.checkpoint(records.len(), report.first_failure);
            totals += &report.counts;
            done += records.len();
        }
        drain_keyed(
            &setup,
            &function,
            &keyed_stream,
            &mut keyed_done,
            keyed_batch as usize,
            now_ms,
            &mut totals,
        )
        .await?;
        peak = peak.max(function.keyed.entries_in_memory().await);
        if pollers.iter().all(|p| p.drained()) {
            break;
        }
        if restarted < restarts && done >= next_restart {
            function.keyed.forget().await;
            restarted += 1;
            next_restart += restart_every;
        }
        if done % 5_000 < batch * 2 {
            eprintln!("  {done}/{events} records");
        }
    }

    let usage = &function.keyed.log.usage;
    let wcu = usage.write_units.load(Ordering::Relaxed);
    let rcu = usage.read_units.load(Ordering::Relaxed);
    let per_event = |n: u64| n as f64 / events as f64;
    println!(
        "## joiner cost, {events} input events (ctr {ctr}, batch {batch}, keyed batch {keyed_batch}, \
         {keyed_shards} keyed shards, {restarts} restarts, duplicates {duplicates})"
    );
    println!(
        "joined pairs: {}, impressions forwarded: {}, duplicates ignored: {}, unmatched: {}, \
         keyed records skipped: {}",
        totals.joined, totals.forwarded, totals.duplicates, totals.unmatched, totals.skipped
    );
    println!(
        "state log: {} bytes written ({:.1} bytes per input event)",
        usage.write_bytes.load(Ordering::Relaxed),
        usage.write_bytes.load(Ordering::Relaxed) as f64 / events as f64
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
    let ddb: u64 = counter
        .snapshot()
        .into_iter()
        .filter(|((service, _), _)| service.eq_ignore_ascii_case("dynamodb"))
        .map(|(_, n)| n)
        .sum();
    // Kinesis PUT payload units the path puts: the router's keyed records and the joiner's
    // joined records (the producers' own puts of the input events are the same for any
    // design and not counted): one per started 25 KiB.
    let keyed = read_stream(&setup, &keyed_stream).await?;
    let output = read_stream(&setup, &joined_stream).await?;
    let keyed_units: u64 = keyed.iter().map(|r| put_payload_units(r.len())).sum();
    let output_units: u64 = output.iter().map(|r| put_payload_units(r.len())).sum();
    println!(
        "keyed stream: {} records, {} bytes, {keyed_units} PUT payload units",
        keyed.len(),
        keyed.iter().map(Vec::len).sum::<usize>()
    );
    println!(
        "joiner output: {} records, {} bytes, {output_units} PUT payload units",
        output.len(),
        output.iter().map(Vec::len).sum::<usize>()
    );
    // The output against the nested-loop join of the same traffic.
    let mut pairs = std::collections::BTreeSet::new();
    let mut forwarded = std::collections::BTreeMap::<String, usize>::new();
    for data in &output {
        let wire: adpipe_core::model::JoinedWire = serde_json::from_slice(data)?;
        for r in wire.into_records() {
            match r {
                adpipe_core::model::JoinedStreamRecord::Click(c) => {
                    pairs.insert((c.impression_id, c.click_id));
                }
                adpipe_core::model::JoinedStreamRecord::Impression(i) => {
                    *forwarded.entry(i.impression_id).or_default() += 1;
                }
            }
        }
    }
    let reference: std::collections::BTreeSet<(String, String)> = scenario
        .reference_join(&rules)
        .into_iter()
        .map(|r| (r.impression_id, r.click_id))
        .collect();
    println!(
        "memory: at most {peak} impression ids held at once; {} moved to cold pages",
        totals.evicted
    );
    println!(
        "check: {} pairs (reference join {}, {}), {} impressions forwarded (of {}, each once: {})",
        pairs.len(),
        reference.len(),
        if pairs == reference {
            "same"
        } else {
            "DIFFERENT"
        },
        forwarded.len(),
        scenario.impressions.len(),
        forwarded.values().all(|n| *n == 1)
    );
    println!(
        "{}",
        summary_line(events as u64, wcu, rcu, ddb, keyed_units + output_units)
    );
    Ok(())
}

/// Runs the joiner over every keyed record not yet done, in batches of `batch` per shard.
async fn drain_keyed(
    setup: &Clients,
    function: &adpipe_joiner::AwsFunction,
    stream: &str,
    done: &mut BTreeMap<String, String>,
    batch: usize,
    now_ms: i64,
    totals: &mut Counts,
) -> anyhow::Result<()> {
    loop {
        let records = read_records(setup, stream, done, batch).await?;
        if records.is_empty() {
            return Ok(());
        }
        let mut by_shard: BTreeMap<String, Vec<adpipe_core::model::InputRecord>> = BTreeMap::new();
        for r in records {
            by_shard
                .entry(r.position.shard.clone())
                .or_default()
                .push(r);
        }
        for (shard, records) in by_shard {
            let report = function.keyed.process(&records, now_ms).await;
            *totals += &report.counts;
            let upto = report.first_failure.unwrap_or(records.len());
            if upto == 0 {
                anyhow::bail!("keyed batch failed: {:?}", report.failures);
            }
            done.insert(shard, records[upto - 1].position.sequence_number.clone());
        }
    }
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
                && a.keyed_batch == 100
                && a.keyed_shards == 1
                && a.restarts == 1
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
