//! The keyed joiner's memory over hours of traffic, at the template's defaults: bounded by the
//! memory budget whatever the rate.
//!
//! Usage: cargo run --release -p adpipe-bench --bin joiner-memory -- \
//!          [--minutes 120] [--rate 1000] [--memory-mb 512] [--warm-window-s S] [--max-ahead-s S] \
//!          [--replay-every 30] [--replay-age 40] [--batch 500] [--keyed-batch 1000]
//!
//! Simulated time, in memory (the router, the keyed joiner, `MemoryStateLog`, which enforces
//! DynamoDB's item limit and counts its units by DynamoDB's rules): every simulated minute
//! brings `rate × 60` input events (2 % clicks, 1 % delivered twice), with event times within
//! the ten minutes after the minute starts. Every `--replay-every` minutes the traffic of
//! `--replay-age` minutes ago is delivered again (an operator's replay): those events left
//! memory long ago, so each is decided after reading the cold pages, and must come out as a
//! repeat. At the end the joined stream is checked against the nested-loop join of all the
//! traffic.
//!
//! The joiner's configuration is the template's: `WarmWindowSeconds` 4,230,
//! `MaxEventTimeAheadSeconds` 3,600 and the memory budget of a `--memory-mb` function (400
//! entries per MB), unless `--warm-window-s` / `--max-ahead-s` say otherwise.
//!
//! Memory is measured, not estimated: a counting allocator tags every allocation made while
//! the joiner runs (`KeyedJoiner::process`), except inside its ports (the in-memory log, the
//! joined stream and the dead letters stand for AWS services), and `peak_joiner_mib` is the
//! peak of the tagged bytes still live: the joiner's heap, without the bench's traffic, its
//! reference join, the log's items or the joined stream. The allocator's own overhead and
//! fragmentation are not in it (the process's `VmHWM` is printed too). The last line is
//! `joiner-memory: minutes=M events=N rate=R peak_entries=P end_entries=E peak_joiner_mib=X write_units_per_event=W read_units_per_event=U exact=B`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use adpipe_core::config::JoinerConfig;
use adpipe_core::in_memory::MemoryStateLog;
use adpipe_core::in_memory::{MemoryDeadLetterSink, MemoryRecordSink};
use adpipe_core::join::joiner::KeyedJoiner;
use adpipe_core::join::router::BatchRouter;
use adpipe_core::join::state::{Blob, PutSlot, Slot};
use adpipe_core::model::{JoinedStreamRecord, JoinedWire};
use adpipe_core::ports::{
    DeadLetter, DeadLetterSink, EntryResult, OutRecord, PortError, RecordSink, StateLog,
};
use adpipe_core::testkit::{MemoryKeyedStream, Scenario, ScenarioSize, ShardPoller};
use clap::Parser;

#[global_allocator]
static ALLOCATOR: counting::Tagging = counting::Tagging;

/// A global allocator that tags each allocation made while counting is on (a header word
/// before the block) and keeps the live and peak bytes of the tagged ones.
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    thread_local! {
        static COUNTING: Cell<bool> = const { Cell::new(false) };
    }
    static LIVE: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);
    const TAG: usize = 0x6164_7069_7065_0001;

    pub struct Tagging;

    /// The header before each block: at least a word, and the block's alignment.
    fn layout_with_header(layout: Layout) -> Option<(Layout, usize)> {
        let header = layout.align().max(16);
        let full = Layout::from_size_align(layout.size().checked_add(header)?, header).ok()?;
        Some((full, header))
    }

    // SAFETY: every block is `System`'s, `header` bytes larger and aligned to `header`; the
    // pointer handed out is `header` bytes in, so it keeps the requested alignment and the tag
    // word just before it is inside the header.
    unsafe impl GlobalAlloc for Tagging {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let Some((full, header)) = layout_with_header(layout) else {
                return std::ptr::null_mut();
            };
            let base = unsafe { System.alloc(full) };
            if base.is_null() {
                return base;
            }
            let counted = COUNTING.try_with(Cell::get).unwrap_or(false);
            let block = unsafe { base.add(header) };
            unsafe {
                (block as *mut usize)
                    .sub(1)
                    .write(if counted { TAG } else { 0 })
            };
            if counted {
                let live = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
                PEAK.fetch_max(live, Relaxed);
            }
            block
        }

        unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
            let (full, header) = layout_with_header(layout).expect("allocated with this layout");
            if unsafe { (block as *mut usize).sub(1).read() } == TAG {
                LIVE.fetch_sub(layout.size(), Relaxed);
            }
            unsafe { System.dealloc(block.sub(header), full) };
        }
    }

    /// Turns counting on or off on this thread; the previous state.
    pub fn set(on: bool) -> bool {
        COUNTING.with(|c| c.replace(on))
    }

    /// The tagged bytes live now, and at most so far.
    pub fn bytes() -> (usize, usize) {
        (LIVE.load(Relaxed), PEAK.load(Relaxed))
    }

    /// Counting off until dropped.
    pub struct Paused(bool);

    impl Paused {
        pub fn new() -> Self {
            Paused(set(false))
        }
    }

    impl Drop for Paused {
        fn drop(&mut self) {
            set(self.0);
        }
    }
}

/// A port whose allocations are not the joiner's (it stands for an AWS service).
struct Outside<T>(Arc<T>);

impl<T: StateLog> StateLog for Outside<T> {
    async fn read(&self, log: &str, from: u64) -> Result<Vec<Slot>, PortError> {
        let _p = counting::Paused::new();
        self.0.read(log, from).await
    }
    async fn put(&self, log: &str, slot: &Slot) -> Result<PutSlot, PortError> {
        let _p = counting::Paused::new();
        self.0.put(log, slot).await
    }
    async fn logs(&self) -> Result<Vec<String>, PortError> {
        let _p = counting::Paused::new();
        self.0.logs().await
    }
    async fn register(&self, log: &str) -> Result<(), PortError> {
        let _p = counting::Paused::new();
        self.0.register(log).await
    }
    async fn ack(&self, log: &str, n: u64) -> Result<(), PortError> {
        let _p = counting::Paused::new();
        self.0.ack(log, n).await
    }
    async fn acked(&self, log: &str) -> Result<Option<u64>, PortError> {
        let _p = counting::Paused::new();
        self.0.acked(log).await
    }
    async fn last(&self, log: &str) -> Result<Option<Slot>, PortError> {
        let _p = counting::Paused::new();
        self.0.last(log).await
    }
    async fn put_blob(&self, blob: &Blob) -> Result<(), PortError> {
        let _p = counting::Paused::new();
        self.0.put_blob(blob).await
    }
    async fn blobs(&self, pk: &str, lo: u128, hi: u128) -> Result<Vec<Blob>, PortError> {
        let _p = counting::Paused::new();
        self.0.blobs(pk, lo, hi).await
    }
}

impl<T: RecordSink> RecordSink for Outside<T> {
    async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<EntryResult>, PortError> {
        let _p = counting::Paused::new();
        self.0.put_records(records).await
    }
}

impl<T: DeadLetterSink> DeadLetterSink for Outside<T> {
    async fn put(&self, letter: &DeadLetter) -> Result<(), PortError> {
        let _p = counting::Paused::new();
        self.0.put(letter).await
    }
}

const T0: i64 = 1_795_169_800_000;
const MINUTE: i64 = 60_000;

#[derive(Debug, Parser)]
#[command(name = "joiner-memory")]
struct Args {
    /// Simulated minutes of traffic
    #[arg(long, value_name = "N", default_value_t = 120)]
    minutes: u32,
    /// Input events per simulated second (one keyed shard takes them all)
    #[arg(long, value_name = "N", default_value_t = 1000)]
    rate: u32,
    /// The joiner's memory (`JoinerMemorySize`): its budget is 400 entries per MB
    #[arg(long, value_name = "MB", default_value_t = 512)]
    memory_mb: u32,
    /// The warm window (`WARM_WINDOW_SECONDS`; default: the template's, 4,230)
    #[arg(long, value_name = "S")]
    warm_window_s: Option<u32>,
    /// The clock lead (`MAX_EVENT_TIME_AHEAD_SECONDS`; default: the template's, 3,600); the
    /// traffic's event times run up to 600 s ahead of their arrival
    #[arg(long, value_name = "S")]
    max_ahead_s: Option<u32>,
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

/// What the last line reports.
struct Summary {
    minutes: u32,
    events: u64,
    rate: u32,
    peak_entries: usize,
    end_entries: usize,
    peak_joiner_bytes: usize,
    write_units: u64,
    read_units: f64,
    exact: bool,
}

fn summary_line(s: &Summary) -> String {
    let per = |x: f64| x / s.events.max(1) as f64;
    format!(
        "joiner-memory: minutes={} events={} rate={} peak_entries={} end_entries={} \
         peak_joiner_mib={:.1} write_units_per_event={:.3} read_units_per_event={:.3} exact={}",
        s.minutes,
        s.events,
        s.rate,
        s.peak_entries,
        s.end_entries,
        s.peak_joiner_bytes as f64 / (1024.0 * 1024.0),
        per(s.write_units as f64),
        per(s.read_units),
        s.exact
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut vars = vec![
        ("IMPRESSIONS_STREAM_NAME", "impressions".to_owned()),
        ("CLICKS_STREAM_NAME", "clicks".to_owned()),
        ("JOINED_STREAM_NAME", "joined".to_owned()),
        ("STATE_LOG_TABLE_NAME", "state-log".to_owned()),
        ("DEAD_LETTER_BUCKET", "bucket".to_owned()),
        (
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            args.memory_mb.to_string(),
        ),
    ];
    if let Some(s) = args.warm_window_s {
        vars.push(("WARM_WINDOW_SECONDS", s.to_string()));
    }
    if let Some(s) = args.max_ahead_s {
        vars.push(("MAX_EVENT_TIME_AHEAD_SECONDS", s.to_string()));
    }
    let config =
        JoinerConfig::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))?;
    let rules = config.rules;
    let keyed = Arc::new(MemoryKeyedStream::new("keyed", 1, T0));
    let letters = Arc::new(MemoryDeadLetterSink::default());
    let router = BatchRouter::new(keyed.clone(), letters.clone(), config.clone());
    let log = Arc::new(MemoryStateLog::default());
    let sink = Arc::new(MemoryRecordSink::default());
    let (warm_s, budget) = (config.warm_window_ms / 1000, config.max_entries);
    let joiner = KeyedJoiner::new(
        Outside(log.clone()),
        keyed.ranges(),
        Outside(sink.clone()),
        Outside(letters.clone()),
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
                    let before = counting::set(true);
                    let report = joiner.process(&batch, now).await;
                    counting::set(before);
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
    let (live_bytes, peak_bytes) = counting::bytes();
    println!(
        "## joiner memory: {} simulated minutes at {} events/s, warm window {warm_s} s, budget {budget} entries ({} MB), {replayed} events replayed",
        args.minutes, args.rate, args.memory_mb
    );
    println!(
        "memory: at most {peak} impression ids held (the warm window holds about {}), {end} at the end",
        u64::from(args.rate) * warm_s as u64
    );
    println!(
        "joiner heap: peak {:.1} MiB, {:.1} MiB at the end (counting allocator), {:.0} % of the function's {} MB",
        peak_bytes as f64 / 1048576.0,
        live_bytes as f64 / 1048576.0,
        peak_bytes as f64 / (f64::from(args.memory_mb) * 1_000_000.0) * 100.0,
        args.memory_mb
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
        summary_line(&Summary {
            minutes: args.minutes,
            events,
            rate: args.rate,
            peak_entries: peak,
            end_entries: end,
            peak_joiner_bytes: peak_bytes,
            write_units: wcu,
            read_units: rcu,
            exact,
        })
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_line_names_every_figure() {
        let line = summary_line(&Summary {
            minutes: 120,
            events: 360_000,
            rate: 50,
            peak_entries: 45_000,
            end_entries: 44_000,
            peak_joiner_bytes: 3 * 1024 * 1024 / 2,
            write_units: 18_000,
            read_units: 360.0,
            exact: true,
        });
        assert_eq!(
            line,
            "joiner-memory: minutes=120 events=360000 rate=50 peak_entries=45000 end_entries=44000 \
             peak_joiner_mib=1.5 write_units_per_event=0.050 read_units_per_event=0.001 exact=true"
        );
    }

    #[test]
    fn only_what_is_allocated_while_counting_is_counted() {
        let (live, _) = counting::bytes();
        let outside = vec![0u8; 1 << 20];
        assert_eq!(counting::bytes().0, live);
        let before = counting::set(true);
        let inside = vec![0u8; 1 << 20];
        let paused = {
            let _p = counting::Paused::new();
            vec![0u8; 1 << 20]
        };
        counting::set(before);
        assert_eq!(counting::bytes().0, live + (1 << 20));
        drop((outside, paused));
        assert_eq!(counting::bytes().0, live + (1 << 20));
        drop(inside);
        assert_eq!(counting::bytes().0, live);
    }
}
