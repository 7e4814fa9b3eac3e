//! One batch of the keyed stream through the joiner: decide every event from memory, write the
//! batch as one fenced log slot, then emit. See [`crate::packed`] for the state and its fence.
//!
//! Failure contract: nothing is emitted before the batch's slot is written. If the slot cannot
//! be written (a throttle, another writer took the number), the memory is dropped and the batch
//! fails from its first record; the redelivery rebuilds the state from the log. If outputs were
//! not all accepted, they stay pending (in memory and in the log) and the batch reports its
//! last record failed: the redelivery finds every record in the log, skips them, and emits the
//! pending outputs again, flagged `recovered` where they may be on the stream already.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures::stream::{self, StreamExt};

use crate::batch::{flag_recovered, BatchReport, FUNCTION};
use crate::config::JoinerConfig;
use crate::dead_letter;
use crate::emit;
use crate::keyed::{bucket_of, explicit_hash_key, unpack, BucketRange};
use crate::metrics::Counts;
use crate::model::{pack_impressions, Event, ImpressionRecord, InputRecord, JoinedStreamRecord};
use crate::packed::{
    slots_for_batch, JoinMemory, Lookup, Outcome, Pending, PutSlot, ShardRanges, StateLog,
    StateRules, Stored,
};
use crate::ports::{DeadLetter, DeadLetterSink, OutRecord, PortError, RecordSink};
use crate::validate::{encode_click, encode_impression, RejectReason, Rejection};

/// An eviction pass waits for this many old entries (or for two warm windows), so its pages
/// are full.
pub const EVICT_MIN_ENTRIES: usize = 16_384;

/// A range's memory and the outputs that may already be on the stream.
struct Held {
    memory: JoinMemory,
    maybe_sent: BTreeSet<Pending>,
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
enum Abort {
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

    /// The slots a rebuild reads from a log: from the `warm_from` its newest slot names (every
    /// earlier event is in the cold pages), or all of them.
    async fn warm_slots(&self, log: &str) -> Result<Vec<crate::packed::Slot>, PortError> {
        let Some(last) = self.log.last(log).await? else {
            return Ok(Vec::new());
        };
        let from = crate::packed::decode_body(&last.body)?
            .warm_from
            .unwrap_or(0)
            .min(last.n);
        self.log.read(log, from).await
    }

    /// Reads the ledger items of `log` newer than `after` (not yet swept) into memory.
    async fn read_ledger(
        &self,
        memory: &mut JoinMemory,
        log: &str,
        after: Option<u128>,
    ) -> Result<(), PortError> {
        let (lo, hi) = memory.ledger_span(&self.rules);
        let lo = after.map_or(lo, |a| lo.max(a + 1));
        let items = self
            .log
            .blobs(&crate::packed::ledger_pk(log), lo, hi)
            .await?;
        memory.absorb_ledger(&items)
    }

    async fn rebuild(&self, range: BucketRange, shard: &str) -> Result<Held, PortError> {
        let own = range.log_id();
        let logs = self.log.logs().await?;
        if !logs.contains(&own) {
            self.log.register(&own).await?;
        }
        let mut others = Vec::new();
        for log in logs.iter().filter(|l| **l != own) {
            if BucketRange::from_log_id(log).is_some_and(|r| r.overlaps(&range)) {
                let slots = self.warm_slots(log).await?;
                others.push((log.clone(), slots, self.log.acked(log).await?));
            }
        }
        let slots = self.warm_slots(&own).await?;
        let acked = self.log.acked(&own).await?;
        let mut memory = JoinMemory::rebuild(range, shard, &self.rules, &slots, &others, acked)?;
        for (log, _, _) in &others {
            self.read_ledger(&mut memory, log, None).await?;
        }
        self.read_ledger(&mut memory, &own, None).await?;
        let maybe_sent = memory.pending().cloned().collect();
        Ok(Held { memory, maybe_sent })
    }

    /// Reads what other writers added to this range's log since this memory's head.
    async fn catch_up(&self, held: &mut Held) -> Result<(), PortError> {
        let from = held.memory.head.map_or(0, |h| h + 1);
        let mut slots = self.log.read(&held.memory.log, from).await?;
        // A batch that spans several slots is read from its first.
        if let Some(last) = slots.last() {
            let first = crate::packed::decode_body(&last.body)?.batch_first;
            if first < from {
                slots = self.log.read(&held.memory.log, first).await?;
            }
        }
        let acked = self.log.acked(&held.memory.log).await?;
        held.memory.catch_up(&self.rules, &slots, acked)?;
        // The other writer may have evicted entries and recorded their waiting clicks.
        let log = held.memory.log.clone();
        let known = held.memory.ledger_last(&crate::packed::ledger_pk(&log));
        self.read_ledger(&mut held.memory, &log, known).await?;
        held.maybe_sent = held.memory.pending().cloned().collect();
        Ok(())
    }

    /// Reads the cold pages of these lookups into memory.
    async fn load_cold(
        &self,
        memory: &mut JoinMemory,
        lookups: BTreeSet<Lookup>,
    ) -> Result<(), PortError> {
        for lookup in lookups {
            let (lo, hi) = lookup.key_span();
            let pages = self.log.blobs(&lookup.pk(), lo, hi).await?;
            memory.absorb_pages(&lookup, &pages)?;
        }
        Ok(())
    }

    /// Moves the entries a warm window old to cold pages (after this writer wrote a slot,
    /// which proves it holds the fence). The pages are written before memory forgets anything;
    /// a failed write leaves memory as it was, for the next batch to try again.
    async fn evict(&self, held: &mut Held, report: &mut BatchReport) {
        let Some(head) = held.memory.head else {
            return;
        };
        let ttl = self.ttl_epoch_s(held.memory.now_ms());
        let Some(eviction) = held.memory.plan_eviction(&self.rules, head, ttl) else {
            return;
        };
        let results: Vec<Result<(), PortError>> = stream::iter(eviction.blobs.iter())
            .map(|b| self.log.put_blob(b))
            .buffer_unordered(self.config.max_in_flight.max(1))
            .collect()
            .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            tracing::warn!(error = %e, "cold pages not written; the entries stay in memory");
            return;
        }
        report.counts.evicted += eviction.entries() as u64;
        held.memory.apply_eviction(eviction);
    }

    /// Lambda does not pin a shard to an environment, so one environment may come to hold the
    /// memory of several shards. The budget is the environment's: when the memories of the
    /// other shards and this one's pass it, the idle ones are dropped (a later batch of theirs
    /// rebuilds from the log, as on a cold start).
    async fn trim_other_shards(&self, shard: &str, own: usize) {
        let mut held = self.held.lock().await;
        let mut total = own;
        let mut idle = Vec::new();
        for (other, cell) in held.iter() {
            if other == shard {
                continue;
            }
            if let Ok(guard) = cell.try_lock() {
                let n = guard.as_ref().map_or(0, |h| h.memory.events());
                total = total.saturating_add(n);
                idle.push(other.clone());
            }
        }
        if total > self.rules.max_entries && !idle.is_empty() {
            tracing::info!(
                entries = total,
                max_entries = self.rules.max_entries,
                shards = idle.len(),
                "memory budget passed: dropping the memory of the other shards this environment held"
            );
            for other in idle {
                held.remove(&other);
            }
        }
    }

    fn ttl_epoch_s(&self, now_ms: i64) -> i64 {
        (now_ms + self.rules.dedup_horizon_ms + self.rules.ttl_grace_ms) / 1000
    }

    /// Processes one batch of one keyed-stream shard, in sequence order.
    pub async fn process(&self, records: &[InputRecord], now_ms: i64) -> BatchReport {
        let mut report = BatchReport {
            counts: Counts {
                records_in: records.len() as u64,
                ..Counts::default()
            },
            ..BatchReport::default()
        };
        let Some(first) = records.first() else {
            return report;
        };
        let (stream, shard) = (&first.position.stream, &first.position.shard);
        let fail_all = |report: &mut BatchReport, why: String| {
            report.first_failure = Some(0);
            report.failures.insert(0, why);
            report.counts.failed = records.len() as u64;
        };
        let range = match self.range_of(stream, shard).await {
            Ok(r) => r,
            Err(e) => {
                fail_all(&mut report, format!("shard's bucket range: {e}"));
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
        if guard.as_ref().is_none_or(|h| h.memory.range != range) {
            match self.rebuild(range, shard).await {
                Ok(h) => *guard = Some(h),
                Err(e) => {
                    fail_all(&mut report, format!("rebuilding the join state: {e}"));
                    return report;
                }
            }
        }
        let held = guard.as_mut().expect("just built");
        // Another writer may have taken the slot this environment's memory expects (Lambda
        // does not pin a shard to an environment): the attempt is taken back, the memory
        // catches up from the log, and the batch is decided again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            held.memory.begin();
            report.counts = Counts {
                records_in: records.len() as u64,
                ..Counts::default()
            };
            match self
                .decide_and_write(held, records, now_ms, &mut report)
                .await
            {
                Ok(()) => {
                    held.memory.commit(&self.rules);
                    break;
                }
                Err(abort) => {
                    held.memory.rollback();
                    let why = match abort {
                        Abort::Taken(n) if attempt < 3 => match self.catch_up(held).await {
                            Ok(()) => continue,
                            Err(e) => format!("catching up after slot {n} was taken: {e}"),
                        },
                        Abort::Taken(n) => {
                            format!("log slot {n} was taken by another writer {attempt} times")
                        }
                        Abort::Port(e) => format!("batch not written, will be redone: {e}"),
                    };
                    *guard = None;
                    report.counts = Counts {
                        records_in: records.len() as u64,
                        ..Counts::default()
                    };
                    fail_all(&mut report, why);
                    return report;
                }
            }
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

    /// Records the clicks whose retention ended without a partner (after the batch is written,
    /// so only written state is judged). A failed write leaves them for the next batch.
    async fn sweep_orphans(&self, held: &mut Held, report: &mut BatchReport) {
        let rules = self.rules;
        let candidates = held.memory.orphan_candidates(&rules);
        if candidates.is_empty() {
            return;
        }
        // A partner may be in the cold pages (memory rebuilt from the warm slots): look.
        let lookups: BTreeSet<Lookup> = candidates
            .iter()
            .flat_map(|o| {
                held.memory
                    .lookups_for(&o.click.impression_id, o.click.event_time_ms, &rules)
            })
            .collect();
        if let Err(e) = self.load_cold(&mut held.memory, lookups).await {
            tracing::warn!(error = %e, "cold pages not read; orphans are swept with the next batch");
            return;
        }
        let orphans: Vec<_> = candidates
            .into_iter()
            .filter(|o| !held.memory.has_partner(&o.click, o.arrival_ms, &rules))
            .collect();
        if orphans.is_empty() {
            held.memory.swept(&rules);
            return;
        }
        let letters: Vec<DeadLetter> = orphans
            .iter()
            .map(|o| {
                dead_letter::orphan(
                    &self.config.late_prefix,
                    FUNCTION,
                    &o.click,
                    o.arrival_ms,
                    rules.join.retention_ms,
                    held.memory.now_ms(),
                )
            })
            .collect();
        let results: Vec<Result<(), PortError>> = stream::iter(letters.iter())
            .map(|l| self.dead_letters.put(l))
            .buffer_unordered(self.config.max_in_flight.max(1))
            .collect()
            .await;
        match results.into_iter().find(Result::is_err) {
            Some(Err(e)) => {
                tracing::warn!(error = %e, "orphan records not written; retried with the next batch")
            }
            _ => {
                report.counts.orphaned += orphans.len() as u64;
                held.memory.swept(&rules);
            }
        }
    }

    async fn decide_and_write(
        &self,
        held: &mut Held,
        records: &[InputRecord],
        now_ms: i64,
        report: &mut BatchReport,
    ) -> Result<(), Abort> {
        let cfg = &self.config;
        let rules = self.rules;
        let memory = &mut held.memory;
        let progress_before = memory.progress().map(str::to_owned);
        let mut new_events: Vec<Stored> = Vec::new();
        let mut new_outputs: Vec<Pending> = Vec::new();
        let mut letters: BTreeMap<String, DeadLetter> = BTreeMap::new();
        if !memory.is_complete() {
            let mut lookups = BTreeSet::new();
            for record in records {
                if memory.is_done(&record.position.sequence_number) {
                    continue;
                }
                for keyed in unpack(&record.data).unwrap_or_default() {
                    if let Some(event) = keyed.event() {
                        let t = match &event {
                            Event::Impression(i) => i.event_time_ms,
                            Event::Click(c) => c.event_time_ms,
                        };
                        lookups.extend(memory.lookups_for(event.impression_id(), t, &rules));
                    }
                }
            }
            self.load_cold(memory, lookups).await.map_err(Abort::Port)?;
        }
        let counts = &mut report.counts;
        let mut clock = now_ms;
        for record in records {
            if memory.is_done(&record.position.sequence_number) {
                counts.skipped += 1;
                continue;
            }
            let record_now = record.arrival_ms.unwrap_or(now_ms);
            clock = clock.max(record_now);
            memory.advance(record_now);
            let events = match unpack(&record.data) {
                Ok(events) => events,
                Err(rejection) => {
                    counts.reject(rejection.reason);
                    let letter = dead_letter::rejected(
                        &cfg.dead_letter_prefix,
                        FUNCTION,
                        &record.position,
                        &record.data,
                        &rejection,
                        record_now,
                    );
                    letters.insert(letter.key.clone(), letter);
                    memory.set_progress(&record.position.sequence_number);
                    continue;
                }
            };
            for keyed in events {
                let Some(event) = keyed.event() else { continue };
                // Only this shard's buckets: an event of another bucket would have a second
                // writer (a record put on the keyed stream without its bucket's hash key).
                let bucket = crate::keyed::bucket_of(event.impression_id());
                if !memory.range.contains(bucket) {
                    let rejection = Rejection::new(
                        RejectReason::InvalidKeyedRecord,
                        format!(
                            "bucket {bucket} of this event is not in this shard's range {}",
                            memory.log
                        ),
                    );
                    counts.reject(rejection.reason);
                    let letter = dead_letter::rejected(
                        &cfg.dead_letter_prefix,
                        FUNCTION,
                        &keyed.source,
                        &match &event {
                            Event::Impression(i) => encode_impression(i),
                            Event::Click(c) => encode_click(c),
                        },
                        &rejection,
                        record_now,
                    );
                    letters.insert(letter.key.clone(), letter);
                    continue;
                }
                // Impressions and clicks are counted once, by the router.
                let arrival = keyed.arrival_ms.unwrap_or(record_now);
                let step = memory.decide(&event, arrival, &rules);
                let refusal = match step.outcome {
                    Outcome::New => {
                        counts.buffered += u64::from(step.buffered);
                        new_events.push(match &event {
                            Event::Impression(i) => Stored::Impression(i.clone(), arrival),
                            Event::Click(c) => Stored::Click(c.clone(), arrival),
                        });
                        None
                    }
                    Outcome::Duplicate => {
                        counts.duplicates += 1;
                        None
                    }
                    Outcome::Conflicting => Some(Rejection::new(
                        RejectReason::ConflictingDuplicate,
                        "an event with this id and different content is already stored; nothing was overwritten",
                    )),
                    Outcome::TooManyClicks => Some(Rejection::new(
                        RejectReason::TooManyClicks,
                        format!(
                            "this impression id already holds {} clicks; nothing was stored",
                            crate::join::MAX_CLICKS_PER_IMPRESSION
                        ),
                    )),
                    Outcome::PastHorizon => Some(Rejection::new(
                        RejectReason::PastDedupHorizon,
                        format!(
                            "event time is before {}, the earliest the {} h deduplication horizon can still check; it may repeat an event already delivered",
                            crate::time::format_millis(rules.checkable_from(memory.now_ms())),
                            rules.dedup_horizon_ms / 3_600_000
                        ),
                    )),
                };
                counts.unmatched += u64::from(step.unmatched);
                if let Some(rejection) = refusal {
                    counts.reject(rejection.reason);
                    let data = match &event {
                        Event::Impression(i) => encode_impression(i),
                        Event::Click(c) => encode_click(c),
                    };
                    let letter = dead_letter::rejected(
                        &cfg.dead_letter_prefix,
                        FUNCTION,
                        &keyed.source,
                        &data,
                        &rejection,
                        record_now,
                    );
                    letters.insert(letter.key.clone(), letter);
                }
                for late in step.late {
                    counts.late += 1;
                    let letter = dead_letter::late(
                        &cfg.late_prefix,
                        FUNCTION,
                        &late,
                        rules.join.retention_ms,
                        record_now,
                    );
                    letters.insert(letter.key.clone(), letter);
                }
                for output in step.outputs {
                    memory.add_pending(output.clone());
                    new_outputs.push(output);
                }
            }
            memory.set_progress(&record.position.sequence_number);
        }

        // Letters first: once the slot is written these records are never redone.
        let results: Vec<Result<(), PortError>> = stream::iter(letters.values())
            .map(|l| self.dead_letters.put(l))
            .buffer_unordered(cfg.max_in_flight.max(1))
            .collect()
            .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            return Err(Abort::Port(e));
        }
        if new_events.is_empty() && new_outputs.is_empty() {
            // Nothing to write, so no slot write can reveal a stale memory. A batch of
            // repeats is typically the redelivery of a batch whose outputs were not all
            // accepted, perhaps by another environment: check the log before trusting that
            // nothing is pending.
            let next = memory.head.map_or(0, |h| h + 1);
            match self.log.read(&memory.log, next).await {
                Ok(newer) if newer.is_empty() => return Ok(()),
                Ok(_) => return Err(Abort::Taken(next)),
                Err(e) => return Err(Abort::Port(e)),
            }
        }
        // Events of pending outputs that left the warm slots are written again, so a rebuild
        // from the warm slots can still build every pending output.
        new_events.extend(memory.carried());
        let first = memory.head.map_or(0, |h| h + 1);
        let slots = slots_for_batch(
            first,
            &memory_shard(records),
            progress_before.as_deref(),
            memory.progress(),
            clock.max(memory.now_ms()),
            memory.swept_ms(),
            new_events,
            memory.pending().cloned().collect(),
            memory.cold_marks(),
            self.ttl_epoch_s(clock),
        );
        let slot_clock = clock.max(memory.now_ms());
        for slot in &slots {
            match self.log.put(&memory.log, slot).await {
                Ok(PutSlot::Written) => memory.wrote(slot.n, slot_clock),
                Ok(PutSlot::Taken) => return Err(Abort::Taken(slot.n)),
                Err(e) => return Err(Abort::Port(e)),
            }
        }
        Ok(())
    }

    async fn emit_pending(&self, held: &mut Held, len: usize, report: &mut BatchReport) {
        let pending: Vec<Pending> = held.memory.pending().cloned().collect();
        if pending.is_empty() {
            return;
        }
        let head = held.memory.head;
        // Pairs travel one per record; forwarded impressions in packs, one bucket per pack, so
        // every copy of an impression lands on its bucket's shard.
        let mut sendable: Vec<Vec<Pending>> = Vec::new();
        let mut out = Vec::new();
        let mut forwards: BTreeMap<u32, Vec<(Pending, ImpressionRecord)>> = BTreeMap::new();
        for p in pending {
            let recovered = held.maybe_sent.contains(&p);
            match held.memory.materialize(&p, recovered) {
                Some(JoinedStreamRecord::Impression(record)) => forwards
                    .entry(bucket_of(&record.impression_id))
                    .or_default()
                    .push((p, record)),
                Some(record) => {
                    out.push(OutRecord {
                        partition_key: record.partition_key().to_owned(),
                        data: serde_json::to_vec(&record).expect("a joined record always encodes"),
                        explicit_hash_key: None,
                    });
                    sendable.push(vec![p]);
                }
                None => {
                    // Its events left the state (past the horizon): nothing can rebuild it.
                    tracing::error!(output = ?p, "pending output's events are past the horizon; dropped");
                    held.memory.accepted(&p);
                }
            }
        }
        for (bucket, items) in forwards {
            let (ps, records): (Vec<Pending>, Vec<ImpressionRecord>) = items.into_iter().unzip();
            let mut ps = ps.into_iter();
            for (data, count) in pack_impressions(&records) {
                out.push(OutRecord {
                    partition_key: format!("b{bucket}"),
                    data,
                    explicit_hash_key: Some(explicit_hash_key(bucket)),
                });
                sendable.push(ps.by_ref().take(count).collect());
            }
        }
        let emitted =
            emit::send_all(&self.sink, &out, &self.config.emit_retry, flag_recovered).await;
        report.counts.emit_retries = u64::from(emitted.retried_entries);
        let mut unsent = None;
        for (ps, error) in sendable.into_iter().zip(emitted.errors) {
            for p in ps {
                match &error {
                    None => {
                        match p {
                            Pending::Pair(..) => report.counts.joined += 1,
                            Pending::Forward(_) => report.counts.forwarded += 1,
                        }
                        held.memory.accepted(&p);
                        held.maybe_sent.remove(&p);
                    }
                    Some(e) => {
                        held.maybe_sent.insert(p);
                        unsent.get_or_insert(e.clone());
                    }
                }
            }
        }
        if unsent.is_none() {
            // Every output up to the head is on the stream: a writer that catches up later
            // need not send them again. Losing this write only costs flagged repeats.
            if let Some(n) = head {
                if let Err(e) = self.log.ack(&held.memory.log, n).await {
                    tracing::warn!(error = %e, "acknowledgement not written");
                }
            }
        }
        if let Some(e) = unsent {
            // Every record is in the log; the redelivery of the last one re-emits.
            let last = len - 1;
            report.first_failure = Some(last);
            report
                .failures
                .insert(last, format!("joined records pending, not accepted: {e}"));
            report.counts.failed = 1;
        }
    }
}

fn memory_shard(records: &[InputRecord]) -> String {
    records
        .first()
        .map(|r| r.position.shard.clone())
        .unwrap_or_default()
}
