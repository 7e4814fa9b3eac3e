//! `lake-soak`: the lake's commit cost as the tables age, through the real `IcebergLake` write
//! path (`TableWriter::append`) on the local endpoint. Method and figures: BENCHMARKS.md, "Lake
//! soak: commit cost as the table ages".
//!
//! Usage: cargo build --workspace --all-targets && ./target/debug/lake-soak [--shards 8]
//!          [--campaigns 200] [--batches 40] [--rows 200] [--window 50] … (`--help` lists all)
//!
//! A simulated production history: `--shards` concurrent shards (one `IcebergLake` each, as
//! each shard's enricher invocation has its own), each appending `--batches` batches of
//! `--rows` joined records with its own increasing Kinesis-like sequence numbers, clicks and
//! impressions of one batch appended concurrently as the enricher does. Campaigns follow a
//! Zipf-like popularity. At stated rates a batch carries flagged (`in_doubt`) repeats of rows
//! of the shard's previous batch, and a landed batch is re-appended as the two halves of its
//! range (Lambda's BisectBatchOnFunctionError). Maintenance: only what the lake's commit does
//! itself (manifest merges, snapshot expiry). The stack also runs Glue's table optimizers
//! (compaction), which the local endpoint cannot run, so data files are never compacted here.
//! A batch is one event minute of its writer. Writers are free-running closed loops unless
//! `--max-lag N` holds them to one event clock (none more than N minutes ahead of the
//! slowest), as shards fed by the same producers are.
//!
//! Every request of the lake goes through a metering proxy (`adpipe_bench::proxy`): S3, Glue
//! and DynamoDB requests and bytes per commit are counted from the real traffic, and S3 reads
//! by object kind (manifests, manifest lists, `metadata.json`, data files).
//!
//! The last line on stdout is the summary (`adpipe_bench::soak::summary_line`); keep it stable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use adpipe_aws::{Clients, RequestCounter};
use adpipe_bench::proxy::{Metered, MeteringProxy};
use adpipe_bench::soak::{chart_svg, summary_line, Rng, Traffic, Window, Zipf};
use adpipe_core::enrich::{enrich_click, enrich_impression, EnrichRules};
use adpipe_core::lake::{clicks_batch, impressions_batch};
use adpipe_core::model::{Click, Impression, ImpressionRecord, JoinedRecord};
use adpipe_core::ports::{InputRange, LakeAppend, LakeTable, TableWriter};
use adpipe_it::{create_bucket, create_lease_table, unique, LocalAws};
use adpipe_lake::{key_check_candidates, DynamoDbCommitLease, IcebergLake, KeyScope};
use adpipe_local::cli::share;
use anyhow::Context;
use clap::Parser;
use iceberg::Catalog;
use tokio::sync::mpsc;

/// The lake's write path through a simulated production history, on the local endpoint.
#[derive(Debug, Clone, Parser)]
#[command(name = "lake-soak")]
struct Params {
    /// Concurrent shards (writers)
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = positive)]
    shards: usize,
    /// Live campaigns
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = positive)]
    campaigns: usize,
    /// Zipf exponent of campaign popularity (0: uniform)
    #[arg(long, value_name = "S", default_value_t = 1.0, value_parser = non_negative)]
    zipf: f64,
    /// Batches per shard
    #[arg(long, value_name = "N", default_value_t = 40)]
    batches: usize,
    /// Joined records per batch (at least 2)
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = at_least_two)]
    rows: usize,
    /// Clicks per impression
    #[arg(long, value_name = "P", default_value_t = 0.02, value_parser = share)]
    click_share: f64,
    /// Share of batches carrying flagged repeats of earlier rows
    #[arg(long, value_name = "P", default_value_t = 0.01, value_parser = share)]
    repeat_rate: f64,
    /// Impressions repeated in such a batch (plus one click if any)
    #[arg(long, value_name = "N", default_value_t = 5)]
    repeat_rows: usize,
    /// Share of landed batches re-appended as two halves
    #[arg(long, value_name = "P", default_value_t = 0.005, value_parser = share)]
    bisect_rate: f64,
    /// Concurrent batches per shard (the enricher's ParallelizationFactor): their sequence
    /// ranges interleave, as Lambda's are when it splits a shard by partition key
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = positive)]
    parallelization: usize,
    /// Commits per reported window
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = positive)]
    window: usize,
    /// Event-time lockstep: no writer starts a batch more than N batches (minutes) ahead of the
    /// slowest one, as shards fed by one real clock are (0: free-running writers, which drift
    /// apart as they wait on the leases, so each manifest spans more event hours)
    #[arg(long = "max-lag", value_name = "N", default_value_t = 0)]
    max_lag: usize,
    /// Stop starting batches after this many seconds (0: none)
    #[arg(long = "time-budget-s", value_name = "S", default_value_t = 0)]
    time_budget_s: u64,
    /// Snapshot retention of the commits, in seconds (the enricher's default: 3600)
    #[arg(long = "snapshot-age-s", value_name = "S", default_value_t = 3600)]
    snapshot_age_s: u64,
    /// Generator seed
    #[arg(long, value_name = "N", default_value_t = 7)]
    seed: u64,
    /// Directory for the CSV and the chart
    #[arg(long, value_name = "DIR", default_value = ".local/bench/lake-soak")]
    out: std::path::PathBuf,
}

impl Params {
    fn budget(&self) -> Option<Duration> {
        (self.time_budget_s > 0).then(|| Duration::from_secs(self.time_budget_s))
    }
}

fn positive(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{v:?} is not a positive whole number")),
    }
}

fn at_least_two(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n >= 2 => Ok(n),
        _ => Err(format!("{v:?} is not a whole number of at least 2")),
    }
}

fn non_negative(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{v:?} is not a finite number of at least 0")),
    }
}

/// One joined record of a batch.
#[derive(Debug, Clone)]
enum Rec {
    Imp(Impression),
    /// The click and the impression it follows.
    Click(Box<(Impression, Click)>),
}

/// What one append did, for the collector.
#[derive(Debug)]
struct Event {
    table: LakeTable,
    ms: f64,
    committed: bool,
    files: u64,
    /// Bytes of data files in the snapshot the key check scanned (appends that ran it).
    key_check_bytes: Option<u64>,
    dropped: u64,
    expected_dropped: u64,
    failed_attempts: u64,
}

const BASE_MS: i64 = 1_795_169_730_000;

fn shard_name(shard: usize) -> String {
    format!("shardId-{shard:012}")
}

/// A Kinesis-like sequence number: 56 digits, increasing within a shard.
fn sequence(shard: usize, n: u64) -> String {
    format!("4965685346523545711{shard:05}{n:032}")
}

struct Shard {
    id: usize,
    /// This writer's lane of the shard (0..parallelization) and the number of lanes.
    lane: usize,
    lanes: usize,
    lake: IcebergLake,
    rng: Rng,
    next_seq: u64,
    previous: Vec<Rec>,
}

impl Shard {
    fn generate(&mut self, p: &Params, zipf: &Zipf, batch: usize) -> (Vec<Rec>, usize) {
        let minute = BASE_MS + batch as i64 * 60_000 + self.id as i64 * 997;
        let mut recs: Vec<Rec> = Vec::with_capacity(p.rows + p.repeat_rows + 1);
        let mut recent: Vec<Impression> = self
            .previous
            .iter()
            .filter_map(|r| match r {
                Rec::Imp(i) => Some(i.clone()),
                Rec::Click(_) => None,
            })
            .collect();
        for i in 0..p.rows {
            let click = self.rng.chance(p.click_share / (1.0 + p.click_share));
            if click && !recent.is_empty() {
                let imp = recent[self.rng.scaled_below(recent.len())].clone();
                let c = Click {
                    ad_id: imp.ad_id.clone(),
                    impression_id: imp.impression_id.clone(),
                    campaign_id: imp.campaign_id.clone(),
                    publisher_id: imp.publisher_id.clone(),
                    event_time_ms: imp.event_time_ms + 4_321,
                    device_type: imp.device_type.clone(),
                    geo_location: imp.geo_location.clone(),
                    platform: imp.platform.clone(),
                    click_price: 0.35,
                    click_id: self.rng.uuid(),
                    click_id_derived: false,
                };
                recs.push(Rec::Click(Box::new((imp, c))));
                continue;
            }
            let campaign = zipf.sample(&mut self.rng);
            let imp = Impression {
                ad_id: format!("ad-{campaign}-{}", self.rng.scaled_below(20)),
                impression_id: self.rng.uuid(),
                campaign_id: format!("camp-{campaign:05}"),
                publisher_id: format!("pub-{}", self.rng.scaled_below(500)),
                event_time_ms: minute + i as i64 * 50,
                device_type: ["mobile", "tablet", "desktop", "ios", "tv"][self.rng.scaled_below(5)]
                    .into(),
                geo_location: "US-CA".into(),
                platform: "android".into(),
                ad_type: "banner".into(),
                bid_price: self.rng.scaled_below(10_000) as f64 / 100.0,
            };
            recent.push(imp.clone());
            recs.push(Rec::Imp(imp));
        }
        // Flagged repeats of rows the previous batch landed.
        let mut repeats = 0;
        if !self.previous.is_empty() && self.rng.chance(p.repeat_rate) {
            let imps: Vec<&Rec> = self
                .previous
                .iter()
                .filter(|r| matches!(r, Rec::Imp(_)))
                .collect();
            let mut chosen: Vec<Rec> = Vec::new();
            for _ in 0..p.repeat_rows.min(imps.len()) {
                let r = imps[self.rng.scaled_below(imps.len())].clone();
                let id = |r: &Rec| match r {
                    Rec::Imp(i) => i.impression_id.clone(),
                    Rec::Click(pair) => pair.1.click_id.clone(),
                };
                if !chosen.iter().any(|c| id(c) == id(&r)) {
                    chosen.push(r);
                }
            }
            if let Some(c) = self.previous.iter().find(|r| matches!(r, Rec::Click(_))) {
                chosen.push(c.clone());
            }
            repeats = chosen.len();
            recs.extend(chosen);
        }
        (recs, repeats)
    }
}

/// The appends of one batch (or one half of it): `(table, append)`, clicks first.
fn appends(
    shard: usize,
    (lane, lanes): (usize, usize),
    first_seq: u64,
    recs: &[Rec],
    in_doubt_from: usize,
) -> anyhow::Result<Vec<LakeAppend>> {
    let rules = EnrichRules::default();
    let input = InputRange {
        stream: "adpipe-joined".into(),
        shard: shard_name(shard),
        // Lane `lane` of `lanes` holds every `lanes`-th record of the shard.
        first_sequence: sequence(shard, first_seq * lanes as u64 + lane as u64),
        last_sequence: sequence(
            shard,
            (first_seq + recs.len() as u64 - 1) * lanes as u64 + lane as u64,
        ),
    };
    let (mut clicks, mut click_flags, mut imps, mut imp_flags) = (vec![], vec![], vec![], vec![]);
    for (i, r) in recs.iter().enumerate() {
        let doubt = i >= in_doubt_from;
        match r {
            Rec::Imp(imp) => {
                let processed = imp.event_time_ms + 2_000;
                let e = enrich_impression(&rules, ImpressionRecord::new(imp, doubt), processed)
                    .map_err(|r| anyhow::anyhow!("{r:?}"))?;
                imps.push(e);
                imp_flags.push(doubt);
            }
            Rec::Click(click) => {
                let (imp, c) = &**click;
                let mut pair = JoinedRecord::new(imp, c);
                pair.recovered = doubt;
                let e = enrich_click(&rules, pair, c.event_time_ms + 2_000)
                    .map_err(|r| anyhow::anyhow!("{r:?}"))?;
                clicks.push(e);
                click_flags.push(doubt);
            }
        }
    }
    let mut out = Vec::new();
    if !clicks.is_empty() {
        out.push(LakeAppend {
            table: LakeTable::Clicks,
            input: input.clone(),
            rows: clicks_batch(&clicks)?,
            keys: clicks
                .iter()
                .map(|c| (c.pair.impression_id.clone(), c.pair.click_id.clone()))
                .collect(),
            in_doubt: click_flags,
        });
    }
    if !imps.is_empty() {
        out.push(LakeAppend {
            table: LakeTable::Impressions,
            input,
            rows: impressions_batch(&imps)?,
            keys: imps
                .iter()
                .map(|i| (i.impression.impression_id.clone(), String::new()))
                .collect(),
            in_doubt: imp_flags,
        });
    }
    Ok(out)
}

/// The data bytes the append's duplicate-key check plans to read: the files left after
/// iceberg prunes by the check's filter (partitions and column statistics), as the enricher's
/// own scan plans them. With the unscoped filter of the baseline this was every live data file.
async fn key_check_bytes(
    inspect: &IcebergLake,
    append: &LakeAppend,
    overlap: bool,
) -> anyhow::Result<u64> {
    let t = inspect
        .catalog()
        .load_table(&inspect.ident(append.table))
        .await?;
    let (pick, candidates) = key_check_candidates(append, overlap);
    let Some(scope) = KeyScope::of_rows(&append.rows, &pick)? else {
        return Ok(0);
    };
    if candidates.is_empty() {
        return Ok(0);
    }
    Ok(inspect.key_check_plan(&t, &scope).await?.bytes())
}

/// Manifests in the current snapshot, snapshots in the metadata, and `metadata.json` bytes.
async fn table_state(inspect: &IcebergLake, table: LakeTable) -> anyhow::Result<(u64, u64, u64)> {
    let t = inspect.catalog().load_table(&inspect.ident(table)).await?;
    let snapshots = t.metadata().snapshots().len() as u64;
    let manifests = match t.metadata().current_snapshot() {
        Some(s) => t.manifest_list_reader(s).load().await?.entries().len() as u64,
        None => 0,
    };
    let location = t
        .metadata_location()
        .context("table has no metadata file")?;
    let bytes = t.file_io().new_input(location)?.metadata().await?.size;
    Ok((manifests, snapshots, bytes))
}

/// Appends one table's rows as the enricher does (Lambda would retry a failed batch with the
/// same range: up to 3 tries here), timing the call.
async fn timed_append(
    lake: &IcebergLake,
    inspect: &IcebergLake,
    append: LakeAppend,
    overlap: bool,
    expected_dropped: u64,
) -> anyhow::Result<Event> {
    let table = append.table;
    let checks = overlap || append.in_doubt.iter().any(|d| *d);
    let key_check_bytes = if checks {
        Some(key_check_bytes(inspect, &append, overlap).await?)
    } else {
        None
    };
    let mut failed_attempts = 0;
    loop {
        let t = Instant::now();
        match lake.append(append.clone()).await {
            Ok(r) => {
                return Ok(Event {
                    table,
                    ms: t.elapsed().as_secs_f64() * 1000.0,
                    committed: r.rows_written > 0 && !r.already_committed,
                    files: r.files_written,
                    key_check_bytes,
                    dropped: r.duplicates_dropped,
                    expected_dropped,
                    failed_attempts,
                })
            }
            Err(e) if failed_attempts < 2 => {
                eprintln!("lake-soak: append failed (retrying the same range): {e}");
                failed_attempts += 1;
            }
            Err(e) => return Err(anyhow::anyhow!("append failed 3 times: {e}")),
        }
    }
}

/// Every writer's progress (batches done; `usize::MAX` once it stopped), for `--max-lag`.
struct Pace {
    done: Vec<std::sync::atomic::AtomicUsize>,
    max_lag: usize,
}

impl Pace {
    fn new(writers: usize, max_lag: usize) -> Pace {
        Pace {
            done: (0..writers)
                .map(|_| std::sync::atomic::AtomicUsize::new(0))
                .collect(),
            max_lag,
        }
    }

    fn slowest(&self) -> usize {
        self.done
            .iter()
            .map(|d| d.load(std::sync::atomic::Ordering::Acquire))
            .min()
            .unwrap_or(usize::MAX)
    }

    /// Waits until batch `b` is at most `max_lag` ahead of the slowest writer.
    async fn wait_for(&self, b: usize) {
        if self.max_lag == 0 {
            return;
        }
        while self.slowest().saturating_add(self.max_lag) < b {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn set(&self, writer: usize, done: usize) {
        self.done[writer].store(done, std::sync::atomic::Ordering::Release);
    }
}

/// Marks a writer stopped however its task ends, so no other waits for it.
struct Stopped<'a>(&'a Pace, usize);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.set(self.1, usize::MAX);
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_shard(
    mut shard: Shard,
    p: Arc<Params>,
    zipf: Arc<Zipf>,
    inspect: Arc<IcebergLake>,
    start: Instant,
    events: mpsc::UnboundedSender<Event>,
    pace: Arc<Pace>,
    batches_done: Arc<std::sync::atomic::AtomicUsize>,
) -> anyhow::Result<adpipe_lake::ManifestReads> {
    let writer = shard.id * shard.lanes + shard.lane;
    let _stopped = Stopped(&pace, writer);
    for b in 0..p.batches {
        pace.wait_for(b).await;
        if p.budget().is_some_and(|budget| start.elapsed() > budget) {
            break;
        }
        let (recs, repeats) = shard.generate(&p, &zipf, b);
        let first = shard.next_seq;
        shard.next_seq += recs.len() as u64;
        let repeat_from = recs.len() - repeats;
        let batch = appends(
            shard.id,
            (shard.lane, shard.lanes),
            first,
            &recs,
            repeat_from,
        )?;
        let expected = |t: LakeTable| {
            recs[repeat_from..]
                .iter()
                .filter(|r| {
                    matches!(
                        (r, t),
                        (Rec::Imp(_), LakeTable::Impressions) | (Rec::Click(_), LakeTable::Clicks)
                    )
                })
                .count() as u64
        };
        let mut running = Vec::new();
        for a in batch {
            let e = expected(a.table);
            // Interleaved lanes overlap each other's committed ranges: the check runs.
            running.push(timed_append(&shard.lake, &inspect, a, shard.lanes > 1, e));
        }
        for e in futures::future::join_all(running).await {
            events.send(e?).ok();
        }
        // A bisected retry of the landed batch: both halves of its range, every row already in.
        if shard.rng.chance(p.bisect_rate) {
            let mid = recs.len() / 2;
            for (offset, half) in [(0, &recs[..mid]), (mid, &recs[mid..])] {
                let mut running = Vec::new();
                let lanes = (shard.lane, shard.lanes);
                for a in appends(shard.id, lanes, first + offset as u64, half, usize::MAX)? {
                    let e = a.keys.len() as u64;
                    running.push(timed_append(&shard.lake, &inspect, a, true, e));
                }
                for e in futures::future::join_all(running).await {
                    events.send(e?).ok();
                }
            }
        }
        shard.previous = recs;
        pace.set(writer, b + 1);
        batches_done.store(b + 1, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(shard.lake.manifest_reads())
}

fn traffic_delta(now: &Metered, before: &Metered, service: &str) -> Traffic {
    let (a, b) = (now.service(service), before.service(service));
    Traffic {
        requests: a.requests - b.requests,
        bytes: a.bytes - b.bytes,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let p = Arc::new(Params::parse());
    let local = LocalAws::shared();
    let proxy = MeteringProxy::start(&local.endpoint)?;
    let direct = Clients::new(&local.sdk_config().await);
    let counter = RequestCounter::default();
    let via_proxy = LocalAws {
        endpoint: proxy.url(),
    };
    let metered = Clients::metered(&via_proxy.sdk_config().await, &counter);
    let (bucket, lease_table, db) = (
        unique("soak-lake"),
        unique("soak-lease"),
        unique("soak").replace('-', "_"),
    );
    create_bucket(&direct, &bucket).await?;
    create_lease_table(&direct, &lease_table).await?;
    let vars = [
        ("JOINED_STREAM_NAME", "adpipe-joined".to_owned()),
        ("LAKE_BUCKET", bucket.clone()),
        ("GLUE_DATABASE", db),
        ("COMMIT_LEASE_TABLE", lease_table.clone()),
        ("DEAD_LETTER_BUCKET", bucket),
    ];
    let config = adpipe_core::config::EnricherConfig::from_lookup(|k| {
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })?;
    let lake_config = |endpoint: &str| {
        let mut c = adpipe_enricher::lake_config(
            &config,
            Some(endpoint.to_owned()),
            Some("us-east-1".into()),
        );
        c.credentials = Some(("test".into(), "test".into()));
        c.commit.snapshot_max_age_ms = (p.snapshot_age_s as i64).saturating_mul(1_000);
        c
    };
    // The bench's own reads (table state, key-check sizes) go straight to the endpoint, so the
    // proxy counts only the lake's traffic.
    let inspect = Arc::new(
        IcebergLake::connect(
            lake_config(&local.endpoint),
            DynamoDbCommitLease::new(direct.dynamodb.clone(), &lease_table),
            "soak-inspect".into(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    inspect
        .ensure_tables(&direct.s3)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    println!(
        "## lake-soak: {} shards x {} concurrent batches, {} campaigns (Zipf s={}), {} batches/shard of {} records, click share {}, \
         repeats {} of batches ({} rows + 1 click), bisected retries {} of batches, window {} commits, seed {}",
        p.shards, p.parallelization, p.campaigns, p.zipf, p.batches, p.rows, p.click_share, p.repeat_rate,
        p.repeat_rows, p.bisect_rate, p.window, p.seed
    );
    let c = lake_config(&local.endpoint).commit;
    println!(
        "maintenance: in every commit (merge at {} manifests under {} bytes, keep snapshots younger than {} s and the newest {}, {} previous metadata files, ledger of {} ranges and {} batch ids per shard); the stack's Glue table optimizers do not run on the local endpoint",
        c.manifest_merge_count, c.manifest_target_bytes, c.snapshot_max_age_ms / 1000, c.min_snapshots, c.previous_metadata,
        c.ledger.ranges_per_shard, c.ledger.recent_batches
    );
    println!("{}", Window::CSV_HEADER);

    let zipf = Arc::new(Zipf::new(p.campaigns, p.zipf));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut seeder = Rng::new(p.seed);
    let pace = Arc::new(Pace::new(p.shards * p.parallelization, p.max_lag));
    let mut progress = Vec::new();
    for id in 0..p.shards {
        for lane in 0..p.parallelization {
            let lake = IcebergLake::connect(
                lake_config(&proxy.url()),
                DynamoDbCommitLease::new(metered.dynamodb.clone(), &lease_table),
                format!("soak-shard-{id}-{lane}"),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            let shard = Shard {
                id,
                lane,
                lanes: p.parallelization,
                lake,
                rng: Rng::new(seeder.next_u64()),
                next_seq: 1_000,
                previous: Vec::new(),
            };
            let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            progress.push(Arc::clone(&done));
            tasks.push(tokio::spawn(run_shard(
                shard,
                Arc::clone(&p),
                Arc::clone(&zipf),
                Arc::clone(&inspect),
                start,
                tx.clone(),
                Arc::clone(&pace),
                done,
            )));
        }
    }
    drop(tx);

    std::fs::create_dir_all(&p.out)?;
    let csv_path = p.out.join("lake-soak.csv");
    let mut csv = format!("{}\n", Window::CSV_HEADER);
    let mut windows: Vec<Window> = Vec::new();
    let mut current = Window::default();
    let mut commits = 0u64;
    let mut before = proxy.snapshot();
    let (mut dropped, mut expected_dropped, mut failed) = (0u64, 0u64, 0u64);
    let mut key_check_ms: Vec<f64> = Vec::new();
    let mut window_start = Instant::now();
    loop {
        let Some(e) = rx.recv().await else {
            if (current.commits() as usize) < p.window / 2 {
                // Too few commits for a window of its own: reported below, not as a row.
                break;
            }
            // The last, shorter window (at least half a window) is reported too.
            current.index = windows.len();
            current.seconds = window_start.elapsed().as_secs_f64();
            finish_window(&mut current, &inspect, &proxy, &mut before, commits).await?;
            println!("{}", current.csv_row());
            csv.push_str(&current.csv_row());
            csv.push('\n');
            windows.push(std::mem::take(&mut current));
            break;
        };
        dropped += e.dropped;
        expected_dropped += e.expected_dropped;
        failed += e.failed_attempts;
        current.rows_dropped += e.dropped;
        if let Some(b) = e.key_check_bytes {
            key_check_ms.push(e.ms);
            current.key_checks += 1;
            current.key_check_bytes_max = current.key_check_bytes_max.max(b);
        }
        if !e.committed {
            continue;
        }
        commits += 1;
        current.latencies_ms.push(e.ms);
        match e.table {
            LakeTable::Impressions => current.files_impressions.push(e.files),
            LakeTable::Clicks => current.files_clicks.push(e.files),
        }
        if current.commits() as usize == p.window {
            current.index = windows.len();
            current.seconds = window_start.elapsed().as_secs_f64();
            finish_window(&mut current, &inspect, &proxy, &mut before, commits).await?;
            window_start = Instant::now();
            println!("{}", current.csv_row());
            csv.push_str(&current.csv_row());
            csv.push('\n');
            std::fs::write(&csv_path, &csv)?;
            windows.push(std::mem::take(&mut current));
            current.index = windows.len();
        }
    }
    let mut manifest_reads = adpipe_lake::ManifestReads::default();
    for t in tasks {
        let r = t.await??;
        manifest_reads.fetched += r.fetched;
        manifest_reads.cached += r.cached;
    }
    std::fs::write(&csv_path, &csv)?;
    let title = format!(
        "lake-soak: {} shards x {} lanes, {} campaigns, {} records/batch",
        p.shards, p.parallelization, p.campaigns, p.rows
    );
    let chart_path = p.out.join("lake-soak.svg");
    std::fs::write(&chart_path, chart_svg(&title, &windows))?;
    let m = proxy.snapshot();
    if current.commits() > 0 || current.key_checks > 0 {
        println!(
            "after the last window: {} commits, {} key checks (largest snapshot scanned {} bytes), {} rows dropped, {} bytes of data files read",
            current.commits(),
            current.key_checks,
            current.key_check_bytes_max,
            current.rows_dropped,
            m.data_file_get_bytes - before.data_file_get_bytes
        );
    }
    println!(
        "appends that ran the duplicate-key check: {}, latency p50 {:.0} ms, max {:.0} ms; data files read by the checks in the whole run: {} bytes",
        key_check_ms.len(),
        adpipe_bench::soak::percentile(&key_check_ms, 0.5).unwrap_or(0.0),
        adpipe_bench::soak::percentile(&key_check_ms, 1.0).unwrap_or(0.0),
        m.data_file_get_bytes
    );
    println!(
        "manifests the writers' key checks used: {} fetched, {} from their caches",
        manifest_reads.fetched, manifest_reads.cached
    );
    let done: Vec<usize> = progress
        .iter()
        .map(|d| d.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    println!(
        "batches done per writer: min {} max {} (event minutes apart at the end; --max-lag {})",
        done.iter().min().unwrap_or(&0),
        done.iter().max().unwrap_or(&0),
        p.max_lag
    );
    println!(
        "wall {:.0} s; wrote {} and {}",
        start.elapsed().as_secs_f64(),
        csv_path.display(),
        chart_path.display()
    );
    println!(
        "duplicate check: {dropped} rows dropped, {expected_dropped} expected (repeats and bisected halves){}; {failed} failed append attempts retried",
        if dropped == expected_dropped { "" } else { " — MISMATCH" }
    );
    println!(
        "totals through the proxy: s3 {} requests {} bytes, glue {} requests {} bytes, dynamodb {} requests (the SDK's RequestCounter saw {} DynamoDB requests)",
        m.service("s3").requests,
        m.service("s3").bytes,
        m.service("glue").requests,
        m.service("glue").bytes,
        m.service("dynamodb").requests,
        counter
            .snapshot()
            .iter()
            .filter(|((s, _), _)| s.eq_ignore_ascii_case("dynamodb"))
            .map(|(_, n)| n)
            .sum::<u64>(),
    );
    println!(
        "{}",
        summary_line(commits, &windows, current.key_check_bytes_max)
    );
    Ok(())
}

/// Closes a window: the traffic since the last one, and the tables' state now.
async fn finish_window(
    w: &mut Window,
    inspect: &IcebergLake,
    proxy: &MeteringProxy,
    before: &mut Metered,
    commits: u64,
) -> anyhow::Result<()> {
    let now = proxy.snapshot();
    w.commits_end = commits;
    w.s3 = traffic_delta(&now, before, "s3");
    w.glue = traffic_delta(&now, before, "glue");
    w.dynamodb = traffic_delta(&now, before, "dynamodb");
    w.data_file_get_bytes = now.data_file_get_bytes - before.data_file_get_bytes;
    w.manifest_get_bytes = now.manifest_get_bytes - before.manifest_get_bytes;
    w.manifest_list_get_bytes = now.manifest_list_get_bytes - before.manifest_list_get_bytes;
    w.metadata_json_get_bytes = now.metadata_json_get_bytes - before.metadata_json_get_bytes;
    *before = now;
    for (i, t) in [LakeTable::Impressions, LakeTable::Clicks]
        .into_iter()
        .enumerate()
    {
        let (manifests, snapshots, bytes) = table_state(inspect, t).await?;
        w.manifests[i] = manifests;
        w.snapshots[i] = snapshots;
        w.metadata_bytes[i] = bytes;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[tokio::test]
    async fn lockstep_writers_wait_for_the_slowest_and_never_for_a_stopped_one() {
        let pace = Pace::new(2, 1);
        pace.set(0, 3);
        // Writer 1 has done nothing: batch 1 may start, batch 2 waits.
        pace.wait_for(1).await;
        let waits = tokio::time::timeout(Duration::from_millis(100), pace.wait_for(2)).await;
        assert!(waits.is_err(), "batch 2 started two ahead of the slowest");
        {
            let _stopped = Stopped(&pace, 1);
        }
        tokio::time::timeout(Duration::from_secs(5), pace.wait_for(4))
            .await
            .expect("a stopped writer holds nobody back");
        // Free-running writers never wait.
        Pace::new(2, 0).wait_for(1_000).await;
    }

    #[test]
    fn options_parse_with_their_defaults_and_refuse_typos_and_bad_values() {
        Params::command().debug_assert();
        let p = Params::try_parse_from(["lake-soak"]).expect("defaults");
        assert!(
            p.shards == 8 && p.campaigns == 200 && p.rows == 200 && p.window == 50,
            "{p:?}"
        );
        assert!(p.budget().is_none());
        let p = Params::try_parse_from(["lake-soak", "--time-budget-s", "60", "--zipf", "0"])
            .expect("options");
        assert_eq!(p.budget(), Some(Duration::from_secs(60)));
        for args in [
            &["lake-soak", "--shard", "8"][..],
            &["lake-soak", "--shards", "0"],
            &["lake-soak", "--rows", "1"],
            &["lake-soak", "--repeat-rate", "1.5"],
            &["lake-soak", "--zipf", "-1"],
            &["lake-soak", "--window", "x"],
        ] {
            assert!(Params::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
