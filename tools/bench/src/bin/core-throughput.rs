//! Core throughput: input events per second on one core through the whole CPU path of the
//! deployed pipeline, with in-memory ports: the router (decode, validate, bucket, pack keyed
//! records), the keyed joiner (decide from memory, the batch's compressed log slots, joined
//! records) and then the enricher on what the joiner emitted (decode, validate, enrich, Arrow
//! batches, Parquet with the lake's zstd settings).
//!
//! Usage: cargo build --release --workspace && ./target/release/core-throughput \
//!          [--impressions 1000000] [--ctr 0.02] [--duplicates 0.01] [--out-of-order 0.05] \
//!          [--rounds 3] [--seed 42]
//!
//! Runs on a current-thread runtime, so every figure is one core's work. Batch sizes are the
//! deployed mappings' (`deploy/resources.json`). Each round starts from empty state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use adpipe_bench::{encode_parquet, mib, Spread};
use adpipe_core::config::{EnricherConfig, JoinerConfig};
use adpipe_core::enricher::{BatchEnricher, EnricherSettings};
use adpipe_core::in_memory::{MemoryDeadLetterSink, MemoryRecordSink, MemoryStateLog};
use adpipe_core::join::joiner::KeyedJoiner;
use adpipe_core::join::router::BatchRouter;
use adpipe_core::metrics::Counts;
use adpipe_core::model::{InputRecord, SourcePosition};
use adpipe_core::ports::{AppendReport, LakeAppend, PortError, TableWriter};
use adpipe_core::testkit::{MemoryKeyedStream, ShardPoller};
use adpipe_enricher::ROW_GROUP_ROWS;
use adpipe_lake::writer_properties;
use adpipe_local::cli::share;
use adpipe_local::generator::{generate, TrafficConfig};
use adpipe_local::resources::Resources;
use clap::Parser;
use parquet::file::properties::WriterProperties;

/// Input events per second on one core through the router, the keyed joiner and the enricher
/// (in-memory ports).
#[derive(Debug, Parser)]
#[command(name = "core-throughput")]
struct Args {
    /// Distinct impressions generated
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    impressions: usize,
    /// Mean click-through rate
    #[arg(long, value_name = "P", default_value_t = 0.02, value_parser = share)]
    ctr: f64,
    /// Share of deliveries sent twice
    #[arg(long, value_name = "P", default_value_t = TrafficConfig::default().duplicates,
          value_parser = share)]
    duplicates: f64,
    /// Share of deliveries that arrive out of order
    #[arg(long, value_name = "P", default_value_t = TrafficConfig::default().out_of_order,
          value_parser = share)]
    out_of_order: f64,
    /// Rounds (the figure is their median)
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Seed of the traffic generator
    #[arg(long, value_name = "N", default_value_t = 42)]
    seed: u64,
}

/// A lake table that only encodes: each append becomes one Parquet file in memory, with the
/// lake's writer settings. It counts the time spent encoding, apart from the rest.
struct ParquetInMemory {
    props: WriterProperties,
    encode_ns: AtomicU64,
    rows: AtomicU64,
    bytes: AtomicU64,
}

impl TableWriter for ParquetInMemory {
    async fn append(&self, append: LakeAppend) -> Result<AppendReport, PortError> {
        let t = Instant::now();
        let bytes = encode_parquet(&append.rows, &self.props)
            .map_err(|e| PortError::Rejected(e.to_string()))?;
        self.encode_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let rows = append.rows.num_rows() as u64;
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(AppendReport {
            rows_written: rows,
            files_written: 1,
            bytes_written: bytes.len() as u64,
            ..AppendReport::default()
        })
    }
}

/// The joiner's input as Lambda would deliver it: batches of the mapping's size from both
/// streams, interleaved as they fill in real time (whichever stream is further behind goes
/// next), each with the arrival time its place in the traffic implies.
fn joiner_batches(
    traffic: &adpipe_local::generator::Traffic,
    r: &Resources,
    cfg: &TrafficConfig,
) -> Vec<(Vec<InputRecord>, i64)> {
    let batch = r.joiner_mapping.batch_size;
    let mut pollers = [
        ShardPoller::new(
            &r.impressions_stream.name,
            "shardId-000000000000",
            traffic.impression_records.clone(),
        ),
        ShardPoller::new(
            &r.clicks_stream.name,
            "shardId-000000000000",
            traffic.click_records.clone(),
        ),
    ];
    let totals = [
        traffic.impression_records.len().max(1),
        traffic.click_records.len().max(1),
    ];
    let mut done = [0usize; 2];
    let mut out = Vec::new();
    while pollers.iter().any(|p| !p.drained()) {
        let progress = |done: &[usize; 2], i: usize| done[i] as f64 / totals[i] as f64;
        let i = if pollers[1].drained()
            || (!pollers[0].drained() && progress(&done, 0) <= progress(&done, 1))
        {
            0
        } else {
            1
        };
        let records = pollers[i].next_batch(batch);
        pollers[i].checkpoint(records.len(), None);
        done[i] += records.len();
        let now_ms = cfg.start_ms + (progress(&done, i) * cfg.duration_ms as f64) as i64 + 2_000;
        out.push((records, now_ms));
    }
    out
}

/// Which seconds of a round a stage took.
type Seconds = fn(&Round) -> f64;

/// One round's figures.
struct Round {
    router_s: f64,
    joiner_s: f64,
    enricher_s: f64,
    encode_s: f64,
    counts: Counts,
    joined_out: usize,
    rows: u64,
    parquet_bytes: u64,
    dead_letters: usize,
}

async fn round(
    batches: &[(Vec<InputRecord>, i64)],
    joiner_config: &JoinerConfig,
    enricher_config: &EnricherConfig,
    r: &Resources,
) -> anyhow::Result<Round> {
    let keyed = Arc::new(MemoryKeyedStream::new(&joiner_config.keyed_stream, 1, 0));
    let router = BatchRouter::new(
        keyed.clone(),
        MemoryDeadLetterSink::default(),
        joiner_config.clone(),
    );
    let joiner = KeyedJoiner::new(
        MemoryStateLog::default(),
        keyed.ranges(),
        MemoryRecordSink::default(),
        MemoryDeadLetterSink::default(),
        joiner_config.clone(),
    );
    let mut counts = Counts::default();
    let (mut router_s, mut joiner_s) = (0.0, 0.0);
    let (mut last_ms, mut cursor) = (0, 0);
    for (records, now_ms) in batches {
        // Each input batch is routed, then the keyed records it made are joined in the keyed
        // mapping's batches, as the two mappings of one shard take turns.
        keyed.set_clock(*now_ms);
        let t = Instant::now();
        let report = router.process(records, *now_ms).await;
        router_s += t.elapsed().as_secs_f64();
        anyhow::ensure!(
            report.first_failure.is_none(),
            "router: {:?}",
            report.failures
        );
        counts += &report.counts;
        while cursor < keyed.len(0) {
            let batch = keyed.read(0, cursor, r.keyed_mapping.batch_size);
            cursor += batch.len();
            let t = Instant::now();
            let report = joiner.process(&batch, *now_ms).await;
            joiner_s += t.elapsed().as_secs_f64();
            anyhow::ensure!(
                report.first_failure.is_none(),
                "joiner: {:?}",
                report.failures
            );
            counts += &report.counts;
        }
        last_ms = *now_ms;
    }

    // The joined stream, as the enricher's mapping would batch it.
    let joined = joiner.sink.records();
    let stream = &r.joined_stream.name;
    let enricher_batches: Vec<Vec<InputRecord>> = joined
        .chunks(r.enricher_mapping.batch_size)
        .enumerate()
        .map(|(b, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, rec)| InputRecord {
                    position: SourcePosition {
                        stream: stream.clone(),
                        shard: "shardId-000000000000".into(),
                        sequence_number: format!(
                            "4960{:020}",
                            b * r.enricher_mapping.batch_size + i
                        ),
                        sub_sequence_number: None,
                    },
                    data: rec.data.clone(),
                    invalid_base64: None,
                    arrival_ms: None,
                })
                .collect()
        })
        .collect();
    let lake = ParquetInMemory {
        props: writer_properties(ROW_GROUP_ROWS),
        encode_ns: AtomicU64::new(0),
        rows: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    };
    let enricher = BatchEnricher::new(
        lake,
        MemoryDeadLetterSink::default(),
        EnricherSettings {
            rules: enricher_config.rules,
            dead_letter_prefix: enricher_config.dead_letter_prefix.clone(),
            max_in_flight: 32,
            time_bounds: enricher_config.time_bounds,
            max_days_per_batch: enricher_config.max_days_per_batch,
        },
    );
    let t = Instant::now();
    for records in &enricher_batches {
        let report = enricher.process(records, last_ms).await;
        anyhow::ensure!(report.failed.is_none(), "enricher: {:?}", report.failed);
    }
    let enricher_s = t.elapsed().as_secs_f64();
    let lake = &enricher.lake;
    Ok(Round {
        router_s,
        joiner_s,
        enricher_s,
        encode_s: lake.encode_ns.load(Ordering::Relaxed) as f64 / 1e9,
        counts,
        joined_out: joined.len(),
        rows: lake.rows.load(Ordering::Relaxed),
        parquet_bytes: lake.bytes.load(Ordering::Relaxed),
        dead_letters: router.dead_letters.letters().len() + joiner.dead_letters.letters().len(),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = TrafficConfig {
        seed: args.seed,
        impressions: args.impressions,
        ctr: args.ctr,
        duplicates: args.duplicates,
        out_of_order: args.out_of_order,
        ..TrafficConfig::default()
    };
    let rounds = args.rounds as usize;
    let r = Resources::local();
    let joiner_env = r.joiner_env();
    let joiner_config = JoinerConfig::from_lookup(|k| joiner_env.get(k).cloned())?;
    let enricher_env = r.enricher_env();
    let enricher_config = EnricherConfig::from_lookup(|k| enricher_env.get(k).cloned())?;

    let traffic = generate(&cfg)?;
    let events = traffic.impression_records.len() + traffic.click_records.len();
    let json_bytes: usize = traffic
        .impression_records
        .iter()
        .chain(&traffic.click_records)
        .map(Vec::len)
        .sum();
    let batches = joiner_batches(&traffic, &r, &cfg);
    println!(
        "## core throughput: {} impressions, {} clicks, {events} deliveries ({:.0} MiB of JSON; \
         {} duplicates, {} out of order, {} malformed); input batches of {}, keyed batches of {}, \
         enricher batches of {}",
        traffic.impressions.len(),
        traffic.clicks.len(),
        mib(json_bytes as u64),
        traffic.stats.duplicates,
        traffic.stats.out_of_order,
        traffic.stats.malformed,
        r.joiner_mapping.batch_size,
        r.keyed_mapping.batch_size,
        r.enricher_mapping.batch_size,
    );

    let mut results = Vec::new();
    for n in 0..rounds {
        let res = round(&batches, &joiner_config, &enricher_config, &r).await?;
        eprintln!(
            "  round {}: router {:.2} s, joiner {:.2} s, enricher {:.2} s (Parquet encoding {:.2} s)",
            n + 1,
            res.router_s,
            res.joiner_s,
            res.enricher_s,
            res.encode_s
        );
        results.push(res);
    }
    let last = results
        .last()
        .ok_or_else(|| anyhow::anyhow!("--rounds 0"))?;
    let c = &last.counts;
    println!(
        "joiner: {} joined, {} buffered, {} duplicates, {} unmatched, {} rejected ({} dead letters); \
         joined stream {} records",
        c.joined,
        c.buffered,
        c.duplicates,
        c.unmatched,
        c.rejected_total(),
        last.dead_letters,
        last.joined_out
    );
    println!(
        "enricher: {} rows, {} Parquet bytes (zstd)",
        last.rows, last.parquet_bytes
    );
    let per_s =
        |f: fn(&Round) -> f64| Spread::of(results.iter().map(|x| events as f64 / f(x)).collect());
    let us = |f: Seconds| Spread::of(results.iter().map(|x| f(x) * 1e6 / events as f64).collect());
    println!(
        "| stage | events/s, one core: median (min–max) | µs per input event: median (min–max) |"
    );
    println!("|---|---|---|");
    let stages: [(&str, Seconds); 5] = [
        ("router: decode, validate, bucket, keyed records", |x| {
            x.router_s
        }),
        (
            "keyed joiner: decisions from memory, log slots (zstd), joined records",
            |x| x.joiner_s,
        ),
        ("enricher: decode, validate, enrich, Arrow", |x| {
            x.enricher_s - x.encode_s
        }),
        ("enricher: Parquet encoding (zstd)", |x| x.encode_s),
        ("**whole path**", |x| x.router_s + x.joiner_s + x.enricher_s),
    ];
    for (label, seconds) in stages {
        println!(
            "| {label} | {} | {} |",
            per_s(seconds),
            us(seconds).with_decimals(2)
        );
    }
    println!("({rounds} rounds; events are input deliveries of both streams)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn options_parse_with_their_defaults_and_refuse_typos_and_bad_values() {
        Args::command().debug_assert();
        let a = Args::try_parse_from(["core-throughput"]).expect("defaults");
        assert!(
            a.impressions == 1_000_000 && a.rounds == 3 && a.seed == 42 && a.ctr == 0.02,
            "{a:?}"
        );
        let a = Args::try_parse_from([
            "core-throughput",
            "--impressions",
            "5",
            "--rounds",
            "2",
            "--out-of-order",
            "0.5",
        ])
        .expect("options");
        assert!(
            a.impressions == 5 && a.rounds == 2 && a.out_of_order == 0.5,
            "{a:?}"
        );
        for args in [
            &["core-throughput", "--impresions", "5"][..],
            &["core-throughput", "--rounds", "many"][..],
            &["core-throughput", "--rounds", "0"][..],
            &["core-throughput", "--ctr", "2"][..],
        ] {
            assert!(Args::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
