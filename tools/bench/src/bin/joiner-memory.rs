//! The keyed joiner's memory over hours of traffic: it holds the warm window, not the history.
//!
//! Usage: cargo run --release -p adpipe-bench --bin joiner-memory -- \
//!          [--minutes 120] [--rate 50] [--warm-window-s 900] [--replay-every 30] [--replay-age 40] \
//!          [--batch 500] [--keyed-batch 1000]
//!
//! Simulated time, in memory (the router, the keyed joiner, `MemoryStateLog`, which enforces
//! DynamoDB's item limit and counts its units by DynamoDB's rules): every simulated minute
//! brings `rate × 60` input events (2 % clicks, 1 % delivered twice), with event times within
//! the ten minutes after the minute starts, so the clock lead is set to 660 s. Every
//! `--replay-every` minutes the traffic of `--replay-age` minutes ago is delivered again (an
//! operator's replay): those events left memory long ago, so each is decided after reading the
//! cold pages, and must come out as a repeat. At the end the joined stream is checked against
//! the nested-loop join of all the traffic. The last line is
//! `joiner-memory: minutes=M events=N peak_entries=P end_entries=E write_units_per_event=W read_units_per_event=R exact=B`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use adpipe_core::config::JoinerConfig;
use adpipe_core::in_memory::MemoryStateLog;
use adpipe_core::in_memory::{MemoryDeadLetterSink, MemoryRecordSink};
use adpipe_core::join::joiner::KeyedJoiner;
use adpipe_core::join::router::BatchRouter;
use adpipe_core::model::{JoinedStreamRecord, JoinedWire};
use adpipe_core::testkit::{MemoryKeyedStream, Scenario, ScenarioSize, ShardPoller};
use clap::Parser;

const T0: i64 = 1_795_169_800_000;
const MINUTE: i64 = 60_000;

#[derive(Debug, Parser)]
#[command(name = "joiner-memory")]
struct Args {
    /// Simulated minutes of traffic
    #[arg(long, value_name = "N", default_value_t = 120)]
    minutes: u32,
    /// Input events per simulated second
    #[arg(long, value_name = "N", default_value_t = 50)]
    rate: u32,
    /// The warm window (`WARM_WINDOW_SECONDS`); more than the 660 s lead plus the join window
    #[arg(long, value_name = "S", default_value_t = 900)]
    warm_window_s: u32,
    /// Replay old traffic every this many minutes (0: never)
    #[arg(long, value_name = "N", default_value_t = 30)]
    replay_every: u32,
    /// How old the replayed traffic is, in minutes
    #[arg(long, value_name = "N", default_value_t = 40)]
    replay_age: u32,
    #[arg(long, value_name = "N", default_value_t = 11)]
    seed: u64,
    /// Records per batch of an input stream (the routing mappings' batch size)
    #[arg(long, value_name = "N", default_value_t = 500)]
    batch: usize,
    /// Records per batch of the keyed stream
    #[arg(long, value_name = "N", default_value_t = 1000)]
    keyed_batch: usize,
}

/// The process's peak resident memory (Linux `VmHWM`), in KiB.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn minute_traffic(seed: u64, rate: u32, m: u32) -> Scenario {
    let events = rate as usize * 60;
    let clicks = events / 50;
    Scenario::generate_at(
        seed.wrapping_mul(1_000_003).wrapping_add(u64::from(m)),
        ScenarioSize {
            impressions: events - clicks,
            clicks,
            duplicate_rate: 0.01,
        },
        &format!("m{m}-"),
        T0 + i64::from(m) * MINUTE,
        true,
    )
}

fn summary_line(
    minutes: u32,
    events: u64,
    peak: usize,
    end: usize,
    wcu: u64,
    rcu: f64,
    exact: bool,
) -> String {
    let per = |x: f64| x / events.max(1) as f64;
    format!(
        "joiner-memory: minutes={minutes} events={events} peak_entries={peak} end_entries={end} \
         write_units_per_event={:.3} read_units_per_event={:.3} exact={exact}",
        per(wcu as f64),
        per(rcu)
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vars = [
        ("IMPRESSIONS_STREAM_NAME", "impressions".to_owned()),
        ("CLICKS_STREAM_NAME", "clicks".to_owned()),
        ("JOINED_STREAM_NAME", "joined".to_owned()),
        ("STATE_LOG_TABLE_NAME", "state-log".to_owned()),
        ("DEAD_LETTER_BUCKET", "bucket".to_owned()),
        ("MAX_EVENT_TIME_AHEAD_SECONDS", "660".to_owned()),
        ("WARM_WINDOW_SECONDS", args.warm_window_s.to_string()),
    ];
    let config =
        JoinerConfig::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))?;
    let rules = config.rules;
    let keyed = Arc::new(MemoryKeyedStream::new("keyed", 1, T0));
    let letters = Arc::new(MemoryDeadLetterSink::default());
    let router = BatchRouter::new(keyed.clone(), letters.clone(), config.clone());
    let log = Arc::new(MemoryStateLog::default());
    let sink = Arc::new(MemoryRecordSink::default());
    let joiner = KeyedJoiner::new(
        log.clone(),
        keyed.ranges(),
        sink.clone(),
        letters.clone(),
        config,
    );

    let mut cursor = 0usize;
    let mut events = 0u64;
    let mut peak = 0usize;
    let mut reference: BTreeSet<(String, String)> = BTreeSet::new();
    let mut impressions = 0usize;
    let mut replayed = 0u64;
    for m in 0..args.minutes {
        let traffic = minute_traffic(args.seed, args.rate, m);
        for r in traffic.reference_join(&rules) {
            reference.insert((r.impression_id, r.click_id));
        }
        impressions += traffic.impressions.len();
        let mut sends = vec![traffic];
        if args.replay_every > 0 && m >= args.replay_age && m % args.replay_every == 0 {
            let old = minute_traffic(args.seed, args.rate, m - args.replay_age);
            replayed += (old.impression_stream.len() + old.click_stream.len()) as u64;
            sends.push(old);
        }
        for (k, s) in sends.iter().enumerate() {
            let mut pollers = [
                ShardPoller::new(
                    "impressions",
                    "shardId-000000000000",
                    s.impression_stream.clone(),
                ),
                ShardPoller::new("clicks", "shardId-000000000000", s.click_stream.clone()),
            ];
            let total = s.impression_stream.len() + s.click_stream.len();
            let mut sent = 0usize;
            while pollers.iter().any(|p| !p.drained()) {
                for p in pollers.iter_mut().filter(|p| !p.drained()) {
                    let batch = p.next_batch(args.batch.max(1));
                    sent += batch.len();
                    // Arrival times spread over the minute (a replay arrives at its end).
                    let at = T0
                        + i64::from(m) * MINUTE
                        + if k == 0 {
                            (sent as i64 * MINUTE) / total.max(1) as i64
                        } else {
                            MINUTE
                        };
                    keyed.set_clock(at);
                    let report = router.process(&batch, at).await;
                    anyhow::ensure!(
                        report.first_failure.is_none(),
                        "router failed: {:?}",
                        report.failures
                    );
                    p.checkpoint(batch.len(), None);
                    events += batch.len() as u64;
                }
                loop {
                    let batch = keyed.read(0, cursor, args.keyed_batch.max(1));
                    if batch.is_empty() {
                        break;
                    }
                    let now = batch.last().and_then(|r| r.arrival_ms).unwrap_or(T0);
                    let report = joiner.process(&batch, now).await;
                    anyhow::ensure!(
                        report.first_failure.is_none(),
                        "joiner failed: {:?}",
                        report.failures
                    );
                    cursor += batch.len();
                }
                peak = peak.max(joiner.entries_in_memory().await);
            }
        }
        if m % 10 == 9 {
            let (_, w, r) = log.usage();
            eprintln!(
                "  minute {}: {events} events, {} impression ids in memory (peak {peak}), {} pages and ledger items, {w} write units, {r:.0} read units",
                m + 1,
                joiner.entries_in_memory().await,
                log.blob_count()
            );
        }
    }

    let mut pairs = BTreeSet::new();
    let mut forwarded: BTreeMap<String, usize> = BTreeMap::new();
    let mut flagged = 0usize;
    for r in sink.records() {
        for rec in serde_json::from_slice::<JoinedWire>(&r.data)?.into_records() {
            flagged += usize::from(rec.recovered());
            match rec {
                JoinedStreamRecord::Click(c) => {
                    pairs.insert((c.impression_id, c.click_id));
                }
                JoinedStreamRecord::Impression(i) => {
                    *forwarded.entry(i.impression_id).or_default() += 1
                }
            }
        }
    }
    let exact = pairs == reference
        && forwarded.len() == impressions
        && forwarded.values().all(|n| *n == 1)
        && flagged == 0;
    let end = joiner.entries_in_memory().await;
    let (requests, wcu, rcu) = log.usage();
    println!(
        "## joiner memory: {} simulated minutes at {} events/s, warm window {} s, {replayed} events replayed",
        args.minutes, args.rate, args.warm_window_s
    );
    println!(
        "memory: at most {peak} impression ids held (the warm window holds about {}), {end} at the end",
        u64::from(args.rate) * u64::from(args.warm_window_s)
    );
    println!(
        "process peak memory: {} KiB (VmHWM; the traffic and the joined stream are held too)",
        peak_rss_kib().unwrap_or(0)
    );
    println!(
        "state log and pages: {} items, {requests} requests, {wcu} write units, {rcu:.0} read units",
        log.slot_count() + log.blob_count()
    );
    let by_kind: Vec<String> = log
        .writes_by_kind()
        .iter()
        .map(|(k, w)| {
            format!(
                "{k} {} ({} items, {} bytes each)",
                w.units,
                w.items,
                w.bytes / w.items.max(1)
            )
        })
        .collect();
    println!("write units by item: {}", by_kind.join(", "));
    println!(
        "check: {} pairs (reference join {}), {} impressions forwarded (of {impressions}), {flagged} flagged, dead letters {}",
        pairs.len(),
        reference.len(),
        forwarded.len(),
        letters.letters().len()
    );
    println!(
        "{}",
        summary_line(args.minutes, events, peak, end, wcu, rcu, exact)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_line_names_every_figure() {
        assert_eq!(
            summary_line(120, 360_000, 45_000, 44_000, 18_000, 360.0, true),
            "joiner-memory: minutes=120 events=360000 peak_entries=45000 end_entries=44000 \
             write_units_per_event=0.050 read_units_per_event=0.001 exact=true"
        );
    }
}
