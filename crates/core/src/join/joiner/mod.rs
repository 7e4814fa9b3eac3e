//! One batch of the keyed stream through the joiner: decide every event from memory, write the
//! batch as one fenced log slot, then emit. See [`crate::join::state`] for the state and its fence.
//!
//! Failure contract: nothing is emitted before the batch's slot is written. If the slot cannot
//! be written (a throttle), the batch is taken back in memory and fails from its first record;
//! the redelivery decides it again from the same memory. If another writer took the number,
//! the memory catches up with the log (or is rebuilt from it) and the batch is decided again. If outputs were
//! not all accepted, they stay pending (in memory and in the log) and the batch reports its
//! last record failed: the redelivery finds every record in the log, skips them, and emits the
//! pending outputs again, flagged `recovered` where they may be on the stream already.

mod decide;
mod emission;
mod load;
mod upkeep;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;

use futures::stream::{self, StreamExt};

use crate::config::JoinerConfig;
use crate::join::buckets::BucketRange;
use crate::join::input::BatchReport;
use crate::join::state::{JoinMemory, Pending, StateRules};
use crate::model::InputRecord;
use crate::ports::{DeadLetterSink, PortError, RecordSink, ShardRanges, StateLog};

/// An eviction pass waits for this many old entries (or for two warm windows), so its pages
/// are full.
pub const EVICT_MIN_ENTRIES: usize = 16_384;

/// A range's memory and the outputs that may already be on the stream.
pub(super) struct Held {
    pub(super) memory: JoinMemory,
    pub(super) maybe_sent: BTreeSet<Pending>,
}

/// The joiner over the keyed stream.
pub struct KeyedJoiner<L, R, K, D> {
    pub log: L,
    pub ranges: R,
    pub sink: K,
    pub dead_letters: D,
    pub config: JoinerConfig,
    pub rules: StateRules,
    held: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Held>>>>>,
    shard_ranges: tokio::sync::Mutex<HashMap<String, BucketRange>>,
}

/// Why a batch stopped before its slot was written.
pub(super) enum Abort {
    Port(PortError),
    Taken(u64),
}

impl<L: StateLog, R: ShardRanges, K: RecordSink, D: DeadLetterSink> KeyedJoiner<L, R, K, D> {
    pub fn new(log: L, ranges: R, sink: K, dead_letters: D, config: JoinerConfig) -> Self {
        let rules = StateRules {
            join: config.rules,
            dedup_horizon_ms: config.dedup_horizon_ms,
            max_ahead_ms: config.time_bounds.max_ahead_ms,
            ttl_grace_ms: config.ttl_grace_ms,
            warm_ms: config.warm_window_ms,
            evict_min_entries: EVICT_MIN_ENTRIES,
            max_entries: config.max_entries,
        };
        KeyedJoiner {
            log,
            ranges,
            sink,
            dead_letters,
            config,
            rules,
            held: Default::default(),
            shard_ranges: Default::default(),
        }
    }

    /// Forgets every range's memory (as a new execution environment would start).
    pub async fn forget(&self) {
        self.held.lock().await.clear();
    }

    /// How many impression ids the environment's memory holds, over every range it holds.
    pub async fn entries_in_memory(&self) -> usize {
        let cells: Vec<_> = self.held.lock().await.values().cloned().collect();
        let mut n = 0;
        for cell in cells {
            if let Some(held) = cell.lock().await.as_ref() {
                n += held.memory.events();
            }
        }
        n
    }

    async fn range_of(&self, stream: &str, shard: &str) -> Result<BucketRange, PortError> {
        if let Some(r) = self.shard_ranges.lock().await.get(shard) {
            return Ok(*r);
        }
        let r = self.ranges.range(stream, shard).await?;
        self.shard_ranges.lock().await.insert(shard.to_owned(), r);
        Ok(r)
    }

    pub(super) fn ttl_epoch_s(&self, now_ms: i64) -> i64 {
        (now_ms + self.rules.dedup_horizon_ms + self.rules.ttl_grace_ms) / 1000
    }

    /// Processes one batch of one keyed-stream shard, in sequence order.
    pub async fn process(&self, records: &[InputRecord], now_ms: i64) -> BatchReport {
        let mut report = BatchReport::new(records.len());
        let Some(first) = records.first() else {
            return report;
        };
        let (stream, shard) = (&first.position.stream, &first.position.shard);
        let range = match self.range_of(stream, shard).await {
            Ok(r) => r,
            Err(e) => {
                report.fail_all(records.len(), format!("shard's bucket range: {e}"));
                return report;
            }
        };
        let cell = self
            .held
            .lock()
            .await
            .entry(shard.clone())
            .or_default()
            .clone();
        let mut guard = cell.lock().await;
        self.trim_other_shards(shard, guard.as_ref().map_or(0, |h| h.memory.events()))
            .await;
        let mut rebuilds = 0;
        if guard.as_ref().is_none_or(|h| h.memory.range != range) {
            match self.rebuild(range, shard).await {
                Ok(h) => *guard = Some(h),
                Err(e) => {
                    report.fail_all(records.len(), format!("rebuilding the join state: {e}"));
                    report.counts.rebuilds = 1;
                    return report;
                }
            }
            rebuilds += 1;
        }
        let held = guard.as_mut().expect("just built");
        if let Some(why) = self
            .refuse_while_backlogged(held, records.len(), &mut report)
            .await
        {
            report.fail_all(records.len(), why);
            report.counts.rebuilds = rebuilds;
            return report;
        }
        let decided = self
            .decide_until_written(held, records, now_ms, &mut report, &mut rebuilds)
            .await;
        report.counts.rebuilds = rebuilds;
        if let Err(stop) = decided {
            // A port error (a throttle, a timeout, a dead letter not written) is taken back
            // and the memory kept: it holds what the log holds (a batch stopped part way
            // leaves slots no reader takes in, and the memory's head stays at them). Only a
            // memory that lost the fence again and again, or could not catch up, is dropped.
            if !stop.keep_memory {
                *guard = None;
            }
            report.fail_all(records.len(), stop.why);
            report.counts.rebuilds = rebuilds;
            return report;
        }
        self.sweep_orphans(held, &mut report).await;
        self.emit_pending(held, records.len(), &mut report).await;
        // Only after a slot of this writer's own: a head learnt by catching up is another
        // writer's, and so would its pages' keys be.
        if held.memory.wrote_in_batch() {
            self.evict(held, &mut report).await;
        }
        report
    }

    /// The most outputs a range holds pending: a quarter of the environment's entry budget
    /// (each pins its entry in memory).
    fn max_pending(&self) -> usize {
        (self.rules.max_entries / 4).max(1)
    }

    /// While the joined stream does not take the outputs already pending, and they are as many
    /// as [`KeyedJoiner::max_pending`], no new record is decided: the pending outputs are sent
    /// again, and if they are still too many the batch fails unread (Lambda retries it; the
    /// shard's iterator age grows, which the template alarms on). Otherwise every batch would
    /// add outputs that pin their entries in memory, until the environment ran out of it.
    /// `Some(why)`: refused.
    async fn refuse_while_backlogged(
        &self,
        held: &mut Held,
        records: usize,
        report: &mut BatchReport,
    ) -> Option<String> {
        let limit = self.max_pending();
        if held.memory.pending_len() < limit {
            return None;
        }
        let mut sent = BatchReport::new(records);
        self.emit_pending(held, records, &mut sent).await;
        report.counts.emit_retries = sent.counts.emit_retries;
        report.counts.outputs_lost = sent.counts.outputs_lost;
        report.counts.joined = sent.counts.joined;
        report.counts.forwarded = sent.counts.forwarded;
        let left = held.memory.pending_len();
        (left >= limit).then(|| {
            tracing::warn!(
                pending = left,
                max_pending = limit,
                "the joined stream is not taking the pending outputs: no new record is decided"
            );
            format!(
                "{left} joined records pending, at most {limit}: the joined stream is not taking them, so no new record is decided until it does"
            )
        })
    }

    /// Decides the batch and writes it. Another writer may have taken the slot this
    /// environment's memory expects (Lambda does not pin a shard to an environment): the
    /// attempt is taken back, the memory catches up from the log, and the batch is decided
    /// again, three times at most. `Err`: why the batch must be redone, and whether the
    /// memory (taken back to before the batch) can be kept.
    async fn decide_until_written(
        &self,
        held: &mut Held,
        records: &[InputRecord],
        now_ms: i64,
        report: &mut BatchReport,
        rebuilds: &mut u64,
    ) -> Result<(), Stop> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            held.memory.begin();
            *report = BatchReport::new(records.len());
            let abort = match self.decide_and_write(held, records, now_ms, report).await {
                Ok(()) => {
                    held.memory.commit(&self.rules);
                    return Ok(());
                }
                Err(abort) => abort,
            };
            held.memory.rollback();
            return Err(match abort {
                Abort::Taken(n) if attempt < 3 => match self.catch_up(held).await {
                    Ok(rebuilt) => {
                        *rebuilds += u64::from(rebuilt);
                        continue;
                    }
                    Err(e) => Stop::drop(format!("catching up after slot {n} was taken: {e}")),
                },
                Abort::Taken(n) => Stop::drop(format!(
                    "log slot {n} was taken by another writer {attempt} times"
                )),
                Abort::Port(e) => Stop {
                    why: format!("batch not written, will be redone: {e}"),
                    keep_memory: true,
                },
            });
        }
    }
}

/// Why a batch stopped unwritten, and whether the memory stays.
pub(super) struct Stop {
    why: String,
    keep_memory: bool,
}

impl Stop {
    fn drop(why: String) -> Self {
        Stop {
            why,
            keep_memory: false,
        }
    }
}

/// Runs `put` over `items`, at most `max_in_flight` at once: the first error, if any.
async fn put_all<'a, T: 'a, F, Fut>(
    items: impl IntoIterator<Item = &'a T>,
    max_in_flight: usize,
    put: F,
) -> Result<(), PortError>
where
    F: FnMut(&'a T) -> Fut,
    Fut: Future<Output = Result<(), PortError>>,
{
    let results: Vec<Result<(), PortError>> = stream::iter(items)
        .map(put)
        .buffer_unordered(max_in_flight.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}
