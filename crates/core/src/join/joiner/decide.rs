//! Deciding a batch from memory and writing it: every event's decision, the dead letters,
//! then the batch's log slots, whose conditional write is the fence.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::dead_letter;
use crate::join::buckets::bucket_of;
use crate::join::input::{BatchReport, FUNCTION};
use crate::join::router::{unpack, KeyedEvent};
use crate::join::rule::MAX_CLICKS_PER_IMPRESSION;
use crate::join::state::{slots_for_batch, JoinMemory, Outcome, PutSlot, Stored};
use crate::metrics::Counts;
use crate::model::{Event, InputRecord, SourcePosition};
use crate::ports::{DeadLetter, DeadLetterSink, PortError, RecordSink, ShardRanges, StateLog};
use crate::time::format_millis;
use crate::validate::{encode_event, RejectReason, Rejection};

use super::{put_all, Abort, Held, KeyedJoiner};

/// What deciding a batch came to, written before anything is emitted.
struct Decided {
    /// Events stored for the first time, for the batch's slots.
    events: Vec<Stored>,
    /// How many outputs the batch decided (they are pending in memory).
    outputs: usize,
    /// Dead letters and late pairs, by key: a key written twice is one object.
    letters: BTreeMap<String, DeadLetter>,
    /// Events refused past the deduplication horizon, by the keyed record that carried them:
    /// one object per keyed record (see [`dead_letter::rejected_group`]).
    past_horizon: Vec<(SourcePosition, Vec<DeadLetter>)>,
    /// The latest arrival the batch saw, never earlier than the memory's clock (the slots'
    /// clock and their TTL's base). Arrival times only: the invocation's own clock would make
    /// two attempts at one batch write different slots when the stream lags.
    clock: i64,
}

impl Decided {
    fn letter(&mut self, letter: DeadLetter) {
        self.letters.insert(letter.key.clone(), letter);
    }

    /// Turns each keyed record's events refused past the horizon into one entry.
    fn group_past_horizon(&mut self, prefix: &str, now_ms: i64) {
        for (keyed, entries) in std::mem::take(&mut self.past_horizon) {
            let reason = RejectReason::PastDedupHorizon.as_str();
            self.letter(dead_letter::rejected_group(
                prefix, FUNCTION, &keyed, reason, &entries, now_ms,
            ));
        }
    }
}

impl<L: StateLog, R: ShardRanges, K: RecordSink, D: DeadLetterSink> KeyedJoiner<L, R, K, D> {
    /// Decides every record not yet in the log, dead-letters what must be, and writes the
    /// batch's slots. Nothing is emitted before the slots are written.
    pub(super) async fn decide_and_write(
        &self,
        held: &mut Held,
        records: &[InputRecord],
        now_ms: i64,
        report: &mut BatchReport,
    ) -> Result<(), Abort> {
        let memory = &mut held.memory;
        let progress_before = memory.progress().map(str::to_owned);
        self.load_cold_for(memory, records)
            .await
            .map_err(Abort::Port)?;
        let mut decided = self.decide_batch(memory, records, now_ms, &mut report.counts);
        let recorded_at = decided.clock.max(0);
        decided.group_past_horizon(&self.config.dead_letter_prefix, recorded_at);
        // Letters first: once the slot is written these records are never redone.
        put_all(decided.letters.values(), self.config.max_in_flight, |l| {
            self.dead_letters.put(l)
        })
        .await
        .map_err(Abort::Port)?;
        if decided.events.is_empty() && decided.outputs == 0 {
            return self.check_nothing_newer(memory).await;
        }
        self.write_slots(memory, records, progress_before, decided)
            .await
    }

    /// Reads the cold pages that any event of the batch may need, before any decision.
    async fn load_cold_for(
        &self,
        memory: &mut JoinMemory,
        records: &[InputRecord],
    ) -> Result<(), PortError> {
        if memory.is_complete() {
            return Ok(());
        }
        let mut lookups = BTreeSet::new();
        let mut wanted = HashSet::new();
        for record in records {
            if memory.is_done(&record.position.sequence_number) {
                continue;
            }
            for keyed in unpack(&record.data).unwrap_or_default() {
                if let Some(event) = keyed.event() {
                    let (id, t) = (event.impression_id(), event.event_time_ms());
                    let needed = memory.lookups_for(id, t, &self.rules);
                    if !needed.is_empty() {
                        wanted.insert(id.to_owned());
                    }
                    lookups.extend(needed);
                }
            }
        }
        self.load_cold(memory, lookups, &wanted).await
    }

    /// Decides every record of the batch not yet in the log, in order.
    fn decide_batch(
        &self,
        memory: &mut JoinMemory,
        records: &[InputRecord],
        now_ms: i64,
        counts: &mut Counts,
    ) -> Decided {
        let mut decided = Decided {
            events: Vec::new(),
            outputs: 0,
            letters: BTreeMap::new(),
            past_horizon: Vec::new(),
            clock: memory.now_ms(),
        };
        for record in records {
            if memory.is_done(&record.position.sequence_number) {
                counts.skipped += 1;
                continue;
            }
            let record_now = record.arrival_ms.unwrap_or(now_ms);
            decided.clock = decided.clock.max(record_now);
            memory.advance(record_now);
            match unpack(&record.data) {
                Ok(events) => {
                    decided
                        .past_horizon
                        .push((record.position.clone(), Vec::new()));
                    for keyed in &events {
                        self.decide_event(memory, keyed, record_now, counts, &mut decided);
                    }
                    if decided
                        .past_horizon
                        .last()
                        .is_some_and(|(_, e)| e.is_empty())
                    {
                        decided.past_horizon.pop();
                    }
                }
                Err(rejection) => {
                    counts.reject(rejection.reason);
                    decided.letter(dead_letter::rejected(
                        &self.config.dead_letter_prefix,
                        FUNCTION,
                        &record.position,
                        &record.data,
                        &rejection,
                        record_now,
                    ));
                }
            }
            memory.set_progress(&record.position.sequence_number);
        }
        decided
    }

    /// Decides one event of a keyed record. Impressions and clicks are counted once, by the
    /// router.
    fn decide_event(
        &self,
        memory: &mut JoinMemory,
        keyed: &KeyedEvent,
        record_now: i64,
        counts: &mut Counts,
        decided: &mut Decided,
    ) {
        let Some(event) = keyed.event() else { return };
        // Only this shard's buckets: an event of another bucket would have a second writer
        // (a record put on the keyed stream without its bucket's hash key).
        let bucket = bucket_of(event.impression_id());
        if !memory.range.contains(bucket) {
            let why = format!(
                "bucket {bucket} of this event is not in this shard's range {}",
                memory.log
            );
            let rejection = Rejection::new(RejectReason::InvalidKeyedRecord, why);
            self.refuse(
                &event,
                &keyed.source,
                &rejection,
                record_now,
                counts,
                decided,
            );
            return;
        }
        let arrival = keyed.arrival_ms.unwrap_or(record_now);
        let step = memory.decide(&event, arrival, &self.rules);
        match step.outcome {
            Outcome::New => {
                counts.buffered += u64::from(step.buffered);
                decided.events.push(Stored::of(&event, arrival));
            }
            Outcome::Duplicate => counts.duplicates += 1,
            _ => {}
        }
        if let Some(rejection) = self.refusal(&step.outcome, memory.now_ms()) {
            if step.outcome == Outcome::PastHorizon {
                counts.reject(rejection.reason);
                let entry = dead_letter::rejected(
                    &self.config.dead_letter_prefix,
                    FUNCTION,
                    &keyed.source,
                    &encode_event(&event),
                    &rejection,
                    record_now,
                );
                if let Some((_, entries)) = decided.past_horizon.last_mut() {
                    entries.push(entry);
                }
                return;
            }
            self.refuse(
                &event,
                &keyed.source,
                &rejection,
                record_now,
                counts,
                decided,
            );
        }
        counts.unmatched += u64::from(step.unmatched);
        for late in step.late {
            counts.late += 1;
            decided.letter(dead_letter::late(
                &self.config.late_prefix,
                FUNCTION,
                &late,
                self.rules.join.retention_ms,
                record_now,
            ));
        }
        for output in step.outputs {
            memory.add_pending(output);
            decided.outputs += 1;
        }
    }

    /// Why the state refused an event, if it did.
    fn refusal(&self, outcome: &Outcome, now_ms: i64) -> Option<Rejection> {
        Some(match outcome {
            Outcome::New | Outcome::Duplicate => return None,
            Outcome::Conflicting => Rejection::new(
                RejectReason::ConflictingDuplicate,
                "an event with this id and different content is already stored; nothing was overwritten",
            ),
            Outcome::TooManyClicks => Rejection::new(
                RejectReason::TooManyClicks,
                format!(
                    "this impression id already holds {MAX_CLICKS_PER_IMPRESSION} clicks; nothing was stored"
                ),
            ),
            Outcome::PastHorizon => Rejection::new(
                RejectReason::PastDedupHorizon,
                format!(
                    "event time is before {}, the earliest the {} h deduplication horizon can still check; it may repeat an event already delivered",
                    format_millis(self.rules.checkable_from(now_ms)),
                    self.rules.dedup_horizon_ms / 3_600_000
                ),
            ),
        })
    }

    /// Dead-letters one refused event with its input position.
    fn refuse(
        &self,
        event: &Event,
        source: &SourcePosition,
        rejection: &Rejection,
        record_now: i64,
        counts: &mut Counts,
        decided: &mut Decided,
    ) {
        counts.reject(rejection.reason);
        decided.letter(dead_letter::rejected(
            &self.config.dead_letter_prefix,
            FUNCTION,
            source,
            &encode_event(event),
            rejection,
            record_now,
        ));
    }

    /// A batch with nothing to write has no slot write to reveal a stale memory. A batch of
    /// repeats is typically the redelivery of a batch whose outputs were not all accepted,
    /// perhaps by another environment: check the log before trusting that nothing is pending.
    async fn check_nothing_newer(&self, memory: &JoinMemory) -> Result<(), Abort> {
        let next = memory.head.map_or(0, |h| h + 1);
        match self.log.read(&memory.log, next).await {
            Ok(newer) if newer.is_empty() => Ok(()),
            Ok(_) => Err(Abort::Taken(next)),
            Err(e) => Err(Abort::Port(e)),
        }
    }

    /// Writes the batch as slots numbered after the head, each only if absent.
    async fn write_slots(
        &self,
        memory: &mut JoinMemory,
        records: &[InputRecord],
        progress_before: Option<String>,
        decided: Decided,
    ) -> Result<(), Abort> {
        // Events of pending outputs that left the warm slots are written again, so a rebuild
        // from the warm slots can still build every pending output.
        let mut events = decided.events;
        events.extend(memory.carried());
        let shard = records
            .first()
            .map(|r| r.position.shard.clone())
            .unwrap_or_default();
        let slot_clock = decided.clock.max(memory.now_ms());
        let slots = slots_for_batch(
            memory.head.map_or(0, |h| h + 1),
            &shard,
            progress_before.as_deref(),
            memory.progress(),
            slot_clock,
            memory.swept_ms(),
            events,
            memory.pending().cloned().collect(),
            memory.cold_marks(),
            self.ttl_epoch_s(slot_clock),
        );
        for slot in &slots {
            match self.log.put(&memory.log, slot).await {
                Ok(PutSlot::Written) => memory.wrote(slot.n, slot_clock),
                Ok(PutSlot::Taken) => return Err(Abort::Taken(slot.n)),
                Err(e) => return Err(Abort::Port(e)),
            }
        }
        Ok(())
    }
}
