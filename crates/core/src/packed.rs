//! Packed join state for the keyed stream: one writer per bucket range decides every event in
//! shard order from memory, and persists what a batch changed as **one log slot**, a
//! compressed item written only if absent.
//!
//! A range's state is a log of slots `0, 1, 2, …` in one DynamoDB partition (`log#<range>`).
//! A slot holds the batch's new events (impressions and clicks), the outputs not yet known to
//! be on the joined stream (`pending`), and the shard's progress. Writing slot `n + 1` only if
//! it is absent is the fence: of a timed-out invocation still running, its retry and a
//! duplicate invocation, exactly one writes the next slot; the others find it taken, drop
//! their memory and fail the batch, which is then redelivered and skipped up to the progress.
//!
//! Outputs are emitted after their slot is written. A batch whose outputs were not all
//! accepted carries them in its slots' `pending` until a later batch's emission is accepted,
//! so a crash after the write loses nothing: a fresh instance re-reads the log and re-emits the
//! pending outputs flagged `recovered` (they may be on the stream already).
//!
//! Decisions use only the stored events and each record's arrival time on the keyed stream,
//! never the invocation's clock, so every attempt at a batch decides it the same way.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::join::{attributes, JoinRules, LatePair, MAX_CLICKS_PER_IMPRESSION};
use crate::keyed::{bucket_of, BucketRange};
use crate::ledger::sequence_cmp;
use crate::model::{Click, Event, Impression, ImpressionRecord, JoinedRecord, JoinedStreamRecord};
use crate::ports::PortError;

/// DynamoDB's item size limit (attribute names and values).
pub const DYNAMODB_ITEM_LIMIT: usize = 400 * 1024;
/// Largest compressed slot body written: the rest of the item (keys, TTL) fits in the margin.
pub const MAX_SLOT_BODY_BYTES: usize = 350 * 1024;
/// The slot format's version.
pub const SLOT_FORMAT: u32 = 1;

/// One stored event with its arrival on its input stream (epoch ms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Stored {
    #[serde(rename = "i")]
    Impression(Impression, i64),
    #[serde(rename = "c")]
    Click(Click, i64),
}

impl Stored {
    fn impression_id(&self) -> &str {
        match self {
            Stored::Impression(i, _) => &i.impression_id,
            Stored::Click(c, _) => &c.impression_id,
        }
    }
}

/// An output decided but not yet known to be on the joined stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Pending {
    /// Forward the impression to the lake.
    #[serde(rename = "f")]
    Forward(String),
    /// The joined record of `(impression_id, click_id)`.
    #[serde(rename = "p")]
    Pair(String, String),
}

impl Pending {
    pub fn impression_id(&self) -> &str {
        match self {
            Pending::Forward(i) | Pending::Pair(i, _) => i,
        }
    }
}

/// The body of one log slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotBody {
    pub v: u32,
    /// The keyed-stream shard that wrote the slot.
    pub shard: String,
    /// The last keyed-stream sequence number of `shard` whose events are all in the log.
    pub progress: Option<String>,
    /// The first slot of the batch this slot belongs to (a large batch spans several slots).
    pub batch_first: u64,
    /// The latest record arrival (the decisions' clock) the batch saw, epoch ms.
    pub now_ms: i64,
    /// Clicks that arrived before `swept_ms − retention` have been checked for orphans.
    pub swept_ms: i64,
    pub events: Vec<Stored>,
    /// Every output not yet known to be accepted when the batch was written.
    pub pending: Vec<Pending>,
}

/// A stored slot: its number, compressed body and TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub n: u64,
    pub body: Vec<u8>,
    /// Epoch seconds after which DynamoDB may delete the slot.
    pub ttl_epoch_s: i64,
}

/// The outcome of writing a slot only if absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutSlot {
    Written,
    /// Another writer holds this slot number: this writer's memory is stale.
    Taken,
}

/// The log store (DynamoDB in production, [`MemoryStateLog`] in tests).
pub trait StateLog: Send + Sync {
    /// Every slot of `log` numbered `from` or more, in order.
    fn read(
        &self,
        log: &str,
        from: u64,
    ) -> impl Future<Output = Result<Vec<Slot>, PortError>> + Send;
    /// Writes the slot only if that number is absent in `log`.
    fn put(
        &self,
        log: &str,
        slot: &Slot,
    ) -> impl Future<Output = Result<PutSlot, PortError>> + Send;
    /// Every log id ever registered (one per bucket range a shard has owned).
    fn logs(&self) -> impl Future<Output = Result<Vec<String>, PortError>> + Send;
    /// Registers a log id (idempotent).
    fn register(&self, log: &str) -> impl Future<Output = Result<(), PortError>> + Send;
    /// Records that every output of `log`'s slots up to `n` is on the joined stream.
    fn ack(&self, log: &str, n: u64) -> impl Future<Output = Result<(), PortError>> + Send;
    /// The latest [`StateLog::ack`] of `log`.
    fn acked(&self, log: &str) -> impl Future<Output = Result<Option<u64>, PortError>> + Send;
}

/// Which bucket range a keyed-stream shard owns (Kinesis `ListShards` in production).
pub trait ShardRanges: Send + Sync {
    fn range(
        &self,
        stream: &str,
        shard: &str,
    ) -> impl Future<Output = Result<BucketRange, PortError>> + Send;
}

/// Compresses a slot body (JSON, then zstd).
pub fn encode_body(body: &SlotBody) -> Vec<u8> {
    let json = serde_json::to_vec(body).expect("a slot body always encodes");
    zstd::bulk::compress(&json, 3).expect("zstd compresses any input")
}

/// Reads a slot body back.
pub fn decode_body(bytes: &[u8]) -> Result<SlotBody, PortError> {
    let json = zstd::stream::decode_all(bytes)
        .map_err(|e| PortError::Corrupt(format!("slot body is not zstd: {e}")))?;
    let body: SlotBody = serde_json::from_slice(&json)
        .map_err(|e| PortError::Corrupt(format!("slot body is not a slot: {e}")))?;
    if body.v != SLOT_FORMAT {
        return Err(PortError::Corrupt(format!(
            "slot format {} is not {SLOT_FORMAT}",
            body.v
        )));
    }
    Ok(body)
}

/// The state's tunables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateRules {
    pub join: JoinRules,
    /// How long a delivered event is remembered, so a repeat is recognised (processing time).
    /// Events older than this can no longer be checked and are refused.
    pub dedup_horizon_ms: i64,
    /// How far an event time may be ahead of its arrival (the validation's bound).
    pub max_ahead_ms: i64,
    /// Extra time a slot is kept past the horizon before DynamoDB's TTL may delete it.
    pub ttl_grace_ms: i64,
}

impl StateRules {
    /// The earliest event time still checkable at `now_ms`: an event's first delivery arrived
    /// at most `max_ahead` before its event time, and is remembered for the horizon.
    pub fn checkable_from(&self, now_ms: i64) -> i64 {
        now_ms - self.dedup_horizon_ms + self.max_ahead_ms
    }
}

/// What one event did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    New,
    Duplicate,
    Conflicting,
    TooManyClicks,
    PastHorizon,
}

/// The decision for one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub outcome: Outcome,
    /// New outputs (forward of a first-seen impression, new pairs).
    pub outputs: Vec<Pending>,
    pub late: Vec<LatePair>,
    pub buffered: bool,
    pub unmatched: u32,
}

/// A click whose impression did not arrive within the retention.
#[derive(Debug, Clone, PartialEq)]
pub struct OrphanClick {
    pub click: Click,
    pub arrival_ms: i64,
}

#[derive(Debug, Clone, Default)]
struct Entry {
    impression: Option<(Impression, i64)>,
    clicks: BTreeMap<String, (Click, i64)>,
    last_arrival_ms: i64,
}

/// One writer's state of one bucket range, in memory.
#[derive(Debug, Clone)]
pub struct JoinMemory {
    pub log: String,
    pub range: BucketRange,
    /// The last slot number of the log, if any.
    pub head: Option<u64>,
    shard: String,
    progress: Option<String>,
    entries: HashMap<String, Entry>,
    by_arrival: BTreeSet<(i64, String)>,
    unmatched: BTreeSet<(i64, String, String)>,
    swept_ms: i64,
    now_ms: i64,
    pending: BTreeSet<Pending>,
    undo: Option<Undo>,
}

/// What a batch changed in memory, so an attempt whose slot was taken can be taken back.
#[derive(Debug, Clone, Default)]
struct Undo {
    /// (impression id, click id or `None` for the impression, entry was new, previous latest
    /// arrival), in the order stored.
    stored: Vec<(String, Option<String>, bool, i64)>,
    unmatched_added: Vec<(i64, String, String)>,
    unmatched_removed: Vec<(i64, String, String)>,
    pending_added: Vec<Pending>,
    progress: Option<String>,
    now_ms: i64,
}

impl JoinMemory {
    /// An empty state (a log with no slot yet).
    pub fn empty(range: BucketRange, shard: &str) -> Self {
        JoinMemory {
            log: range.log_id(),
            range,
            head: None,
            shard: shard.to_owned(),
            progress: None,
            entries: HashMap::new(),
            by_arrival: BTreeSet::new(),
            unmatched: BTreeSet::new(),
            swept_ms: i64::MIN,
            now_ms: i64::MIN,
            pending: BTreeSet::new(),
            undo: None,
        }
    }

    /// Starts recording a batch's changes.
    pub fn begin(&mut self) {
        self.undo = Some(Undo {
            progress: self.progress.clone(),
            now_ms: self.now_ms,
            ..Undo::default()
        });
    }

    /// The batch's slots are written: its changes stay, and what passed the horizon goes.
    pub fn commit(&mut self, rules: &StateRules) {
        self.undo = None;
        self.expire(rules);
    }

    /// Takes back every change since [`JoinMemory::begin`].
    pub fn rollback(&mut self) {
        let Some(undo) = self.undo.take() else {
            return;
        };
        for p in &undo.pending_added {
            self.pending.remove(p);
        }
        for u in &undo.unmatched_added {
            self.unmatched.remove(u);
        }
        for u in undo.unmatched_removed {
            self.unmatched.insert(u);
        }
        for (id, click, fresh, previous) in undo.stored.into_iter().rev() {
            if fresh {
                if let Some(entry) = self.entries.remove(&id) {
                    self.by_arrival.remove(&(entry.last_arrival_ms, id));
                }
                continue;
            }
            if let Some(entry) = self.entries.get_mut(&id) {
                match click {
                    Some(c) => {
                        entry.clicks.remove(&c);
                    }
                    None => entry.impression = None,
                }
                if entry.last_arrival_ms != previous {
                    self.by_arrival.remove(&(entry.last_arrival_ms, id.clone()));
                    entry.last_arrival_ms = previous;
                    self.by_arrival.insert((previous, id));
                }
            }
        }
        self.progress = undo.progress;
        self.now_ms = undo.now_ms;
    }

    /// Brings a state up to date with slots another writer added to its own log (`slots`
    /// numbered after [`JoinMemory::head`]), and with the log's acknowledgement: outputs of
    /// slots up to `acked` are known to be on the joined stream.
    pub fn catch_up(
        &mut self,
        rules: &StateRules,
        slots: &[Slot],
        acked: Option<u64>,
    ) -> Result<(), PortError> {
        let mut bodies = Vec::new();
        for slot in slots {
            bodies.push((slot.n, decode_body(&slot.body)?));
        }
        if !bodies.is_empty() {
            // The newest batch's slots carry every output still pending.
            self.pending.clear();
            self.absorb(&bodies, true, acked);
            let ids: BTreeSet<String> = bodies
                .iter()
                .flat_map(|(_, b)| b.events.iter().map(|e| e.impression_id().to_owned()))
                .collect();
            self.refresh_unmatched(&ids, rules);
        }
        if acked.is_some_and(|a| Some(a) >= self.head) {
            self.pending.clear();
        }
        self.expire(rules);
        Ok(())
    }

    /// Rebuilds the state of `range` from its own log (with its acknowledgement) and the logs of
    /// ranges it overlaps (parents before a reshard, each with its acknowledgement). Outputs
    /// still pending in any of them, within this range's buckets, are pending here.
    pub fn rebuild(
        range: BucketRange,
        shard: &str,
        rules: &StateRules,
        own: &[Slot],
        others: &[(String, Vec<Slot>, Option<u64>)],
        acked: Option<u64>,
    ) -> Result<Self, PortError> {
        let mut memory = JoinMemory::empty(range, shard);
        // Other ranges' events first: they are older (a parent is read to its end before its
        // children start).
        for (_, slots, their_ack) in others {
            let mut bodies = Vec::new();
            for slot in slots {
                bodies.push((slot.n, decode_body(&slot.body)?));
            }
            memory.absorb(&bodies, false, *their_ack);
        }
        let mut bodies = Vec::new();
        for slot in own {
            bodies.push((slot.n, decode_body(&slot.body)?));
        }
        memory.absorb(&bodies, true, acked);
        memory.expire(rules);
        memory.rebuild_unmatched(rules);
        Ok(memory)
    }

    /// Takes in a log's slots (in order). Their newest batch's pending outputs are pending here
    /// unless the log's acknowledgement covers them.
    fn absorb(&mut self, bodies: &[(u64, SlotBody)], own: bool, acked: Option<u64>) {
        let Some((head_n, head)) = bodies.last() else {
            return;
        };
        let all_sent = acked.is_some_and(|a| a >= *head_n);
        for (_, body) in bodies {
            for event in &body.events {
                if self.range.contains(bucket_of(event.impression_id())) {
                    self.store(event.clone());
                }
            }
        }
        for (n, body) in bodies {
            if *n >= head.batch_first && !all_sent {
                for p in &body.pending {
                    if self.range.contains(bucket_of(p.impression_id())) {
                        self.pending.insert(p.clone());
                    }
                }
            }
        }
        self.now_ms = self.now_ms.max(head.now_ms);
        self.swept_ms = self.swept_ms.max(head.swept_ms);
        if own {
            self.head = Some(*head_n);
            if head.shard == self.shard {
                self.progress = head.progress.clone();
            }
        }
    }

    fn rebuild_unmatched(&mut self, rules: &StateRules) {
        let from = self.swept_ms.saturating_sub(rules.join.retention_ms);
        for entry in self.entries.values() {
            for (click, arrival) in entry.clicks.values() {
                let matched = entry
                    .impression
                    .as_ref()
                    .is_some_and(|(imp, _)| attributes(&rules.join, imp, click));
                if !matched && *arrival >= from {
                    self.unmatched.insert((
                        *arrival,
                        click.impression_id.clone(),
                        click.click_id.clone(),
                    ));
                }
            }
        }
    }

    /// Recomputes which clicks of these impression ids still wait for a partner.
    fn refresh_unmatched(&mut self, ids: &BTreeSet<String>, rules: &StateRules) {
        let from = self.swept_ms.saturating_sub(rules.join.retention_ms);
        for id in ids {
            let Some(entry) = self.entries.get(id) else {
                continue;
            };
            for (click, arrival) in entry.clicks.values() {
                let key = (
                    *arrival,
                    click.impression_id.clone(),
                    click.click_id.clone(),
                );
                let matched = entry
                    .impression
                    .as_ref()
                    .is_some_and(|(imp, _)| attributes(&rules.join, imp, click));
                if matched || *arrival < from {
                    self.unmatched.remove(&key);
                } else {
                    self.unmatched.insert(key);
                }
            }
        }
    }

    fn store(&mut self, event: Stored) {
        let id = event.impression_id().to_owned();
        let fresh = !self.entries.contains_key(&id);
        let entry = self.entries.entry(id.clone()).or_default();
        if let Some(undo) = self.undo.as_mut() {
            let click = match &event {
                Stored::Impression(..) => None,
                Stored::Click(c, _) => Some(c.click_id.clone()),
            };
            undo.stored
                .push((id.clone(), click, fresh, entry.last_arrival_ms));
        }
        let arrival = match event {
            Stored::Impression(imp, a) => {
                entry.impression.get_or_insert((imp, a));
                a
            }
            Stored::Click(click, a) => {
                entry
                    .clicks
                    .entry(click.click_id.clone())
                    .or_insert((click, a));
                a
            }
        };
        if fresh {
            entry.last_arrival_ms = arrival;
            self.by_arrival.insert((arrival, id));
        } else if arrival > entry.last_arrival_ms {
            self.by_arrival.remove(&(entry.last_arrival_ms, id.clone()));
            entry.last_arrival_ms = arrival;
            self.by_arrival.insert((arrival, id));
        }
    }

    /// Forgets events whose latest arrival is past the horizon.
    fn expire(&mut self, rules: &StateRules) {
        let cutoff = self.now_ms.saturating_sub(rules.dedup_horizon_ms);
        while let Some((at, id)) = self.by_arrival.first().cloned() {
            if at >= cutoff {
                break;
            }
            self.by_arrival.pop_first();
            self.entries.remove(&id);
        }
    }

    /// The keyed-stream progress of `shard` (the last sequence number fully in the log).
    pub fn progress(&self) -> Option<&str> {
        self.progress.as_deref()
    }

    /// Whether a keyed record is already in the log.
    pub fn is_done(&self, sequence_number: &str) -> bool {
        self.progress.as_deref().is_some_and(|p| {
            matches!(
                sequence_cmp(sequence_number, p),
                Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
            )
        })
    }

    pub fn set_progress(&mut self, sequence_number: &str) {
        self.progress = Some(sequence_number.to_owned());
    }

    pub fn pending(&self) -> impl Iterator<Item = &Pending> {
        self.pending.iter()
    }

    pub fn add_pending(&mut self, p: Pending) {
        if self.pending.insert(p.clone()) {
            if let Some(undo) = self.undo.as_mut() {
                undo.pending_added.push(p);
            }
        }
    }

    fn add_unmatched(&mut self, u: (i64, String, String)) {
        if self.unmatched.insert(u.clone()) {
            if let Some(undo) = self.undo.as_mut() {
                undo.unmatched_added.push(u);
            }
        }
    }

    fn remove_unmatched(&mut self, u: &(i64, String, String)) {
        if self.unmatched.remove(u) {
            if let Some(undo) = self.undo.as_mut() {
                undo.unmatched_removed.push(u.clone());
            }
        }
    }

    /// Outputs accepted by the joined stream are no longer pending.
    pub fn accepted(&mut self, p: &Pending) {
        self.pending.remove(p);
    }

    pub fn events(&self) -> usize {
        self.entries.len()
    }

    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    pub fn swept_ms(&self) -> i64 {
        self.swept_ms
    }

    /// Advances the clock to a record's arrival (never backwards).
    pub fn advance(&mut self, now_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// The clicks whose retention has ended without a partner, as of the clock (call after a
    /// batch is written, so only written state is judged). [`JoinMemory::swept`] forgets them
    /// once they are recorded.
    pub fn orphans(&self, rules: &StateRules) -> Vec<OrphanClick> {
        let cutoff = self.now_ms.saturating_sub(rules.join.retention_ms);
        self.unmatched
            .iter()
            .take_while(|(at, _, _)| *at < cutoff)
            .filter_map(|(_, imp, click)| {
                let (c, a) = self.entries.get(imp)?.clicks.get(click)?;
                Some(OrphanClick {
                    click: c.clone(),
                    arrival_ms: *a,
                })
            })
            .collect()
    }

    /// The orphans up to the clock are recorded.
    pub fn swept(&mut self, rules: &StateRules) {
        let cutoff = self.now_ms.saturating_sub(rules.join.retention_ms);
        while self
            .unmatched
            .first()
            .is_some_and(|(at, _, _)| *at < cutoff)
        {
            self.unmatched.pop_first();
        }
        self.swept_ms = self.now_ms;
    }

    /// Decides one event arriving (on its input stream) at `arrival_ms`, and stores it if it
    /// is new. The clock must have been advanced to the record's arrival first.
    pub fn decide(&mut self, event: &Event, arrival_ms: i64, rules: &StateRules) -> Step {
        let mut step = Step {
            outcome: Outcome::New,
            outputs: Vec::new(),
            late: Vec::new(),
            buffered: false,
            unmatched: 0,
        };
        let event_time = match event {
            Event::Impression(i) => i.event_time_ms,
            Event::Click(c) => c.event_time_ms,
        };
        let id = event.impression_id().to_owned();
        let entry = self.entries.get(&id);
        let joins = |imp: &Impression, ia: i64, click: &Click, ca: i64| {
            if !attributes(&rules.join, imp, click) {
                None
            } else {
                Some((ia - ca).abs() <= rules.join.retention_ms)
            }
        };
        let checkable_from = rules.checkable_from(self.now_ms);
        match event {
            Event::Impression(imp) => {
                let stored = entry.and_then(|e| e.impression.as_ref()).map(|(s, _)| s);
                if let Some(outcome) = repeat_or_unchecked(stored, imp, event_time, checkable_from)
                {
                    step.outcome = outcome;
                    return step;
                }
                let clicks: Vec<(Click, i64)> = entry
                    .map(|e| e.clicks.values().cloned().collect())
                    .unwrap_or_default();
                for (click, ca) in &clicks {
                    match joins(imp, arrival_ms, click, *ca) {
                        None => step.unmatched += 1,
                        Some(true) => {
                            self.remove_unmatched(&(
                                *ca,
                                click.impression_id.clone(),
                                click.click_id.clone(),
                            ));
                            step.outputs
                                .push(Pending::Pair(id.clone(), click.click_id.clone()));
                        }
                        Some(false) => step.late.push(LatePair {
                            impression: imp.clone(),
                            click: click.clone(),
                            arrival_gap_ms: (arrival_ms - ca).abs(),
                        }),
                    }
                }
                step.buffered = clicks.is_empty();
                step.outputs.push(Pending::Forward(id));
                self.store(Stored::Impression(imp.clone(), arrival_ms));
            }
            Event::Click(click) => {
                let stored = entry
                    .and_then(|e| e.clicks.get(&click.click_id))
                    .map(|(s, _)| s);
                if let Some(outcome) =
                    repeat_or_unchecked(stored, click, event_time, checkable_from)
                {
                    step.outcome = outcome;
                    return step;
                }
                if entry.is_some_and(|e| e.clicks.len() >= MAX_CLICKS_PER_IMPRESSION) {
                    step.outcome = Outcome::TooManyClicks;
                    return step;
                }
                let mut matched = false;
                match entry.and_then(|e| e.impression.clone()) {
                    Some((imp, ia)) => match joins(&imp, ia, click, arrival_ms) {
                        None => step.unmatched += 1,
                        Some(true) => {
                            matched = true;
                            step.outputs
                                .push(Pending::Pair(id.clone(), click.click_id.clone()));
                        }
                        Some(false) => {
                            step.late.push(LatePair {
                                impression: imp.clone(),
                                click: click.clone(),
                                arrival_gap_ms: (arrival_ms - ia).abs(),
                            });
                        }
                    },
                    None => step.buffered = true,
                }
                if !matched {
                    self.add_unmatched((
                        arrival_ms,
                        click.impression_id.clone(),
                        click.click_id.clone(),
                    ));
                }
                self.store(Stored::Click(click.clone(), arrival_ms));
            }
        }
        step
    }

    /// The joined-stream record of a pending output, from the stored events.
    pub fn materialize(&self, p: &Pending, recovered: bool) -> Option<JoinedStreamRecord> {
        let entry = self.entries.get(p.impression_id())?;
        let (imp, _) = entry.impression.as_ref()?;
        match p {
            Pending::Forward(_) => Some(JoinedStreamRecord::Impression(ImpressionRecord::new(
                imp, recovered,
            ))),
            Pending::Pair(_, click_id) => {
                let (click, _) = entry.clicks.get(click_id)?;
                let mut record = JoinedRecord::new(imp, click);
                record.recovered = recovered;
                Some(JoinedStreamRecord::Click(record))
            }
        }
    }
}

/// A stored event with the arriving one's id is a duplicate (same content) or a conflict; an
/// event not stored but older than the horizon can no longer be checked. `None`: it is new.
fn repeat_or_unchecked<T: PartialEq>(
    stored: Option<&T>,
    arriving: &T,
    event_time_ms: i64,
    checkable_from_ms: i64,
) -> Option<Outcome> {
    match stored {
        Some(s) if s == arriving => Some(Outcome::Duplicate),
        Some(_) => Some(Outcome::Conflicting),
        None if event_time_ms < checkable_from_ms => Some(Outcome::PastHorizon),
        None => None,
    }
}

/// Splits what a batch writes into slot bodies of at most [`MAX_SLOT_BODY_BYTES`] compressed,
/// numbered from `first`. Only the last slot carries the batch's final progress; every slot
/// carries `batch_first`, so a reader takes the pending outputs of all of them.
#[allow(clippy::too_many_arguments)]
pub fn slots_for_batch(
    first: u64,
    shard: &str,
    progress_before: Option<&str>,
    progress_after: Option<&str>,
    now_ms: i64,
    swept_ms: i64,
    events: Vec<Stored>,
    pending: Vec<Pending>,
    ttl_epoch_s: i64,
) -> Vec<Slot> {
    enum Item {
        E(Stored),
        P(Pending),
    }
    let items: Vec<Item> = events
        .into_iter()
        .map(Item::E)
        .chain(pending.into_iter().map(Item::P))
        .collect();
    fn body_of(items: &[Item], base: &SlotBody) -> SlotBody {
        let mut body = base.clone();
        for item in items {
            match item {
                Item::E(e) => body.events.push(e.clone()),
                Item::P(p) => body.pending.push(p.clone()),
            }
        }
        body
    }
    fn split<'a>(items: &'a [Item], base: &SlotBody, out: &mut Vec<&'a [Item]>) {
        if items.len() <= 1 || encode_body(&body_of(items, base)).len() <= MAX_SLOT_BODY_BYTES {
            out.push(items);
            return;
        }
        let (a, b) = items.split_at(items.len() / 2);
        split(a, base, out);
        split(b, base, out);
    }
    let base = SlotBody {
        v: SLOT_FORMAT,
        shard: shard.to_owned(),
        progress: progress_before.map(str::to_owned),
        batch_first: first,
        now_ms,
        swept_ms,
        events: Vec::new(),
        pending: Vec::new(),
    };
    let mut chunks = Vec::new();
    split(&items, &base, &mut chunks);
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut body = body_of(chunk, &base);
            if i == last {
                body.progress = progress_after.map(str::to_owned);
            }
            Slot {
                n: first + i as u64,
                body: encode_body(&body),
                ttl_epoch_s,
            }
        })
        .collect()
}

/// An in-memory log with DynamoDB's behaviour where it matters: a slot over the item limit is
/// refused, a conditional put on a taken number writes nothing, and slots past their TTL are
/// deleted when [`MemoryStateLog::expire`] runs (as DynamoDB does, some time after the TTL).
#[derive(Debug, Default)]
pub struct MemoryStateLog {
    slots: std::sync::Mutex<BTreeMap<(String, u64), Slot>>,
    logs: std::sync::Mutex<BTreeSet<String>>,
    acks: std::sync::Mutex<BTreeMap<String, u64>>,
    requests: std::sync::atomic::AtomicU64,
    write_units: std::sync::atomic::AtomicU64,
    read_units_x2: std::sync::atomic::AtomicU64,
}

/// The size DynamoDB counts for a slot item (attribute names and values).
pub fn slot_item_size(log: &str, slot: &Slot) -> usize {
    let pk = "pk".len() + "log#".len() + log.len();
    let sk = "sk".len() + 21;
    let ttl = "ttl".len() + 21;
    pk + sk + ttl + "d".len() + slot.body.len()
}

impl MemoryStateLog {
    /// Deletes every slot whose TTL is before `now_epoch_s`.
    pub fn expire(&self, now_epoch_s: i64) {
        self.slots
            .lock()
            .unwrap()
            .retain(|_, s| s.ttl_epoch_s >= now_epoch_s);
    }

    pub fn slot_count(&self) -> usize {
        self.slots.lock().unwrap().len()
    }

    /// Requests, write units and read units (eventually consistent reads) so far.
    pub fn usage(&self) -> (u64, u64, f64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.requests.load(Relaxed),
            self.write_units.load(Relaxed),
            self.read_units_x2.load(Relaxed) as f64 / 2.0,
        )
    }
}

impl StateLog for MemoryStateLog {
    async fn read(&self, log: &str, from: u64) -> Result<Vec<Slot>, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        let slots: Vec<Slot> = self
            .slots
            .lock()
            .unwrap()
            .range((log.to_owned(), from)..=(log.to_owned(), u64::MAX))
            .map(|(_, s)| s.clone())
            .collect();
        let bytes: usize = slots.iter().map(|s| slot_item_size(log, s)).sum();
        self.requests
            .fetch_add(1 + (bytes / (1024 * 1024)) as u64, Relaxed);
        self.read_units_x2
            .fetch_add(bytes.div_ceil(4096).max(1) as u64, Relaxed);
        Ok(slots)
    }

    async fn put(&self, log: &str, slot: &Slot) -> Result<PutSlot, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        let size = slot_item_size(log, slot);
        if size > DYNAMODB_ITEM_LIMIT {
            return Err(PortError::Rejected(format!(
                "ValidationException: Item size has exceeded the maximum allowed size ({size} bytes)"
            )));
        }
        self.write_units
            .fetch_add(size.div_ceil(1024) as u64, Relaxed);
        let mut slots = self.slots.lock().unwrap();
        let key = (log.to_owned(), slot.n);
        if slots.contains_key(&key) {
            return Ok(PutSlot::Taken);
        }
        slots.insert(key, slot.clone());
        Ok(PutSlot::Written)
    }

    async fn logs(&self) -> Result<Vec<String>, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        self.read_units_x2.fetch_add(1, Relaxed);
        Ok(self.logs.lock().unwrap().iter().cloned().collect())
    }

    async fn register(&self, log: &str) -> Result<(), PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        self.write_units.fetch_add(1, Relaxed);
        self.logs.lock().unwrap().insert(log.to_owned());
        Ok(())
    }

    async fn ack(&self, log: &str, n: u64) -> Result<(), PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        self.write_units.fetch_add(1, Relaxed);
        self.acks.lock().unwrap().insert(log.to_owned(), n);
        Ok(())
    }

    async fn acked(&self, log: &str) -> Result<Option<u64>, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        self.read_units_x2.fetch_add(2, Relaxed);
        Ok(self.acks.lock().unwrap().get(log).copied())
    }
}

/// A fixed shard-to-range map for tests.
#[derive(Debug, Clone, Default)]
pub struct FixedShardRanges(pub BTreeMap<String, BucketRange>);

impl ShardRanges for FixedShardRanges {
    async fn range(&self, _stream: &str, shard: &str) -> Result<BucketRange, PortError> {
        Ok(self.0.get(shard).copied().unwrap_or(BucketRange::ALL))
    }
}

impl<T: StateLog> StateLog for std::sync::Arc<T> {
    fn read(
        &self,
        log: &str,
        from: u64,
    ) -> impl Future<Output = Result<Vec<Slot>, PortError>> + Send {
        (**self).read(log, from)
    }
    fn put(
        &self,
        log: &str,
        slot: &Slot,
    ) -> impl Future<Output = Result<PutSlot, PortError>> + Send {
        (**self).put(log, slot)
    }
    fn logs(&self) -> impl Future<Output = Result<Vec<String>, PortError>> + Send {
        (**self).logs()
    }
    fn register(&self, log: &str) -> impl Future<Output = Result<(), PortError>> + Send {
        (**self).register(log)
    }
    fn ack(&self, log: &str, n: u64) -> impl Future<Output = Result<(), PortError>> + Send {
        (**self).ack(log, n)
    }
    fn acked(&self, log: &str) -> impl Future<Output = Result<Option<u64>, PortError>> + Send {
        (**self).acked(log)
    }
}
