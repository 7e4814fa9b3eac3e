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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
/// The slot format's version: 2 is a JSON header with column-wise events and pending outputs
/// ([`crate::codec`]); 1, still read, was the whole body as JSON.
pub const SLOT_FORMAT: u32 = 2;

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
    /// Every event that arrived before this time and is not in memory is in the cold pages
    /// (absent: nothing was ever evicted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_from_ms: Option<i64>,
    /// The first slot a rebuild reads: earlier slots hold only events arrived before
    /// `cold_from_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_from: Option<u64>,
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
    /// The newest slot of `log`, if any.
    fn last(&self, log: &str) -> impl Future<Output = Result<Option<Slot>, PortError>> + Send;
    /// Writes a blob (a cold page, a ledger item); its key is unique to its writer.
    fn put_blob(&self, blob: &Blob) -> impl Future<Output = Result<(), PortError>> + Send;
    /// Every blob of partition `pk` with a key in `lo..=hi`, in key order (strongly
    /// consistent).
    fn blobs(
        &self,
        pk: &str,
        lo: u128,
        hi: u128,
    ) -> impl Future<Output = Result<Vec<Blob>, PortError>> + Send;
}

/// A stored blob beside the log: a page of evicted events (`cold#<bucket>`) or a ledger item
/// of evicted clicks still waiting for a partner (`orph#<log>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub pk: String,
    pub sk: u128,
    pub body: Vec<u8>,
    pub ttl_epoch_s: i64,
}

/// Which bucket range a keyed-stream shard owns (Kinesis `ListShards` in production).
pub trait ShardRanges: Send + Sync {
    fn range(
        &self,
        stream: &str,
        shard: &str,
    ) -> impl Future<Output = Result<BucketRange, PortError>> + Send;
}

/// Compresses a slot body: its header as JSON, its events and pending outputs column-wise
/// ([`crate::codec`]), then zstd.
pub fn encode_body(body: &SlotBody) -> Vec<u8> {
    let header = SlotBody {
        events: Vec::new(),
        pending: Vec::new(),
        ..body.clone()
    };
    let json = serde_json::to_vec(&header).expect("a slot header always encodes");
    crate::codec::encode_slot(&json, &body.events, &body.pending)
}

/// Reads a slot body back (either format).
pub fn decode_body(bytes: &[u8]) -> Result<SlotBody, PortError> {
    let raw = zstd::stream::decode_all(bytes)
        .map_err(|e| PortError::Corrupt(format!("slot body is not zstd: {e}")))?;
    let (json, events, pending, format) = if raw.starts_with(crate::codec::SLOT_MAGIC) {
        let (header, events, pending) = crate::codec::decode_slot(&raw)?;
        (header, Some(events), pending, SLOT_FORMAT)
    } else {
        (&raw[..], None, Vec::new(), 1)
    };
    let mut body: SlotBody = serde_json::from_slice(json)
        .map_err(|e| PortError::Corrupt(format!("slot body is not a slot: {e}")))?;
    if body.v != format {
        return Err(PortError::Corrupt(format!(
            "slot format {} is not {format}",
            body.v
        )));
    }
    if let Some(events) = events {
        body.events = events;
        body.pending = pending;
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
    /// How long an event stays in memory after its entry's latest arrival (the warm window);
    /// older entries move to cold pages, looked up by bucket and event time when a late event
    /// needs them. `0` keeps everything for the horizon.
    pub warm_ms: i64,
    /// An eviction pass waits until it can move at least this many entries (so pages are
    /// full), or until the oldest entry is two warm windows old.
    pub evict_min_entries: usize,
    /// The environment's memory budget: when the memories of the shards it holds pass this
    /// many entries, those of the shards not being processed are dropped (`usize::MAX`: no
    /// budget).
    pub max_entries: usize,
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
    /// See [`SlotBody::cold_from_ms`]; `i64::MIN` while memory holds everything.
    cold_from_ms: i64,
    /// See [`SlotBody::warm_from`].
    warm_from: Option<u64>,
    /// The warm slots' clocks (slot number → `now_ms`), to find `warm_from` at an eviction.
    slot_times: BTreeMap<u64, i64>,
    /// Events known to be in the cold pages (read back from them, or written by an eviction
    /// while their entry stayed warm): an eviction does not write them again.
    paged: HashSet<(String, Option<String>)>,
    /// Cold page windows already read into memory: (bucket, level, window).
    looked_up: HashSet<(u32, u8, i64)>,
    /// Ledger items not yet swept: clicks evicted while waiting for a partner, by ledger key.
    ledger: BTreeMap<(u128, String), Vec<Stored>>,
    /// The last eviction pass's entries, forgotten once a slot records its `cold_from`.
    to_drop: Vec<String>,
    drop_before_ms: i64,
    /// Whether the current batch wrote a slot.
    wrote_in_batch: bool,
}

/// One read of cold pages: a bucket's windows `first..=last` at one level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lookup {
    pub bucket: u32,
    pub level: u8,
    pub first: i64,
    pub last: i64,
}

impl Lookup {
    pub fn pk(&self) -> String {
        page_pk(self.bucket)
    }

    /// The blob keys of every page of these windows, whoever wrote them.
    pub fn key_span(&self) -> (u128, u128) {
        (
            page_key(self.level, self.first, 0, 0, 0),
            page_key(
                self.level,
                self.last,
                9_999,
                PAGE_SLOT_MOD - 1,
                PAGE_PARTS - 1,
            ),
        )
    }
}

/// Page levels: a minute window, or an hour window (a sparse bucket-hour).
pub const LEVEL_MINUTE: u8 = 1;
pub const LEVEL_HOUR: u8 = 2;
const LEVELS: [(u8, i64); 2] = [(LEVEL_MINUTE, 60_000), (LEVEL_HOUR, 3_600_000)];
/// A bucket-minute evicted with at least this many events in one pass gets a page of its own,
/// so a lookup in a busy bucket reads a minute, not an hour; sparser minutes share their
/// hour's page, so pages stay full.
pub const MINUTE_PAGE_MIN_EVENTS: usize = 64;
const PAGE_SLOT_MOD: u64 = 1_000_000_000_000;
const PAGE_PARTS: u32 = 1_000;

/// The partition of a bucket's cold pages.
pub fn page_pk(bucket: u32) -> String {
    format!("cold#{bucket}")
}

/// The partition of a log's ledger items.
pub fn ledger_pk(log: &str) -> String {
    format!("orph#{log}")
}

/// A page's key: level, window, its writer (the log's range and the slot the writer had just
/// written, which no other writer can have written) and its part. 28 digits at most, within
/// DynamoDB's 38 for a number.
fn page_key(level: u8, window: i64, range: u32, slot: u64, part: u32) -> u128 {
    let mut k = u128::from(level);
    k = k * 100_000_000 + window.clamp(0, 99_999_999) as u128;
    k = k * 10_000 + u128::from(range.min(9_999));
    k = k * u128::from(PAGE_SLOT_MOD) + u128::from(slot % PAGE_SLOT_MOD);
    k * u128::from(PAGE_PARTS) + u128::from(part.min(PAGE_PARTS - 1))
}

/// A ledger item's key: the eviction boundary, the writer's slot, the part (28 digits at
/// most).
fn ledger_key(boundary_ms: i64, slot: u64, part: u32) -> u128 {
    let k =
        boundary_ms.max(0) as u128 * u128::from(PAGE_SLOT_MOD) + u128::from(slot % PAGE_SLOT_MOD);
    k * u128::from(PAGE_PARTS) + u128::from(part.min(PAGE_PARTS - 1))
}

fn ledger_boundary(key: u128) -> i64 {
    (key / u128::from(PAGE_SLOT_MOD) / u128::from(PAGE_PARTS)) as i64
}

/// Above every blob key (and within DynamoDB's 38 digits).
const KEY_MAX: u128 = 10u128.pow(30);

/// Compresses a page of events (column-wise, [`crate::codec`], then zstd). Pages are written
/// once per eviction pass, so they take zstd's stronger levels.
pub fn encode_events(events: &[Stored]) -> Vec<u8> {
    crate::codec::encode_events(events, PAGE_ZSTD_LEVEL)
}

const PAGE_ZSTD_LEVEL: i32 = 19;

/// Reads a page of events back (either format: column-wise, or JSON from earlier versions).
pub fn decode_events(bytes: &[u8]) -> Result<Vec<Stored>, PortError> {
    let raw = zstd::stream::decode_all(bytes)
        .map_err(|e| PortError::Corrupt(format!("page is not zstd: {e}")))?;
    if raw.starts_with(crate::codec::EVENTS_MAGIC) {
        return crate::codec::decode_events(&raw);
    }
    serde_json::from_slice(&raw)
        .map_err(|e| PortError::Corrupt(format!("page is not a list of events: {e}")))
}

/// Splits events into compressed bodies of at most [`MAX_SLOT_BODY_BYTES`].
fn encode_split(events: &[Stored], out: &mut Vec<Vec<u8>>) {
    let body = encode_events(events);
    if events.len() <= 1 || body.len() <= MAX_SLOT_BODY_BYTES {
        out.push(body);
        return;
    }
    let (a, b) = events.split_at(events.len() / 2);
    encode_split(a, out);
    encode_split(b, out);
}

/// What one eviction pass writes and then forgets.
#[derive(Debug, Clone, Default)]
pub struct Eviction {
    pub boundary_ms: i64,
    /// Cold pages, then the ledger item (if any evicted click still waits for a partner).
    pub blobs: Vec<Blob>,
    ids: Vec<String>,
    ledger: Option<((u128, String), Vec<Stored>)>,
    newly_paged: Vec<(String, Option<String>)>,
}

impl Eviction {
    /// How many entries (impression ids) it moves.
    pub fn entries(&self) -> usize {
        self.ids.len()
    }
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
            cold_from_ms: i64::MIN,
            warm_from: None,
            slot_times: BTreeMap::new(),
            paged: HashSet::new(),
            looked_up: HashSet::new(),
            ledger: BTreeMap::new(),
            to_drop: Vec::new(),
            drop_before_ms: i64::MIN,
            wrote_in_batch: false,
        }
    }

    /// Starts recording a batch's changes.
    pub fn begin(&mut self) {
        self.wrote_in_batch = false;
        self.undo = Some(Undo {
            progress: self.progress.clone(),
            now_ms: self.now_ms,
            ..Undo::default()
        });
    }

    /// The batch's slots are written: its changes stay, and what passed the horizon goes.
    pub fn commit(&mut self, rules: &StateRules) {
        self.undo = None;
        if self.wrote_in_batch {
            self.drop_evicted();
        }
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
        for (n, body) in bodies {
            for event in &body.events {
                if self.range.contains(bucket_of(event.impression_id())) {
                    self.store(event.clone());
                }
            }
            if own {
                self.slot_times.insert(*n, body.now_ms);
            }
        }
        if let Some(c) = head.cold_from_ms {
            self.cold_from_ms = self.cold_from_ms.max(c);
        }
        if own && head.warm_from.is_some() {
            self.warm_from = head.warm_from;
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
        // A click the ledger holds is swept from the ledger, never from memory as well.
        let ledgered: HashSet<(&str, &str)> = self
            .ledger
            .values()
            .flatten()
            .filter_map(|e| match e {
                Stored::Click(c, _) => Some((c.impression_id.as_str(), c.click_id.as_str())),
                Stored::Impression(..) => None,
            })
            .collect();
        let mut remove = Vec::new();
        let mut insert = Vec::new();
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
                let ledgered =
                    ledgered.contains(&(click.impression_id.as_str(), click.click_id.as_str()));
                if matched || *arrival < from || ledgered {
                    remove.push(key);
                } else {
                    insert.push(key);
                }
            }
        }
        for key in remove {
            self.unmatched.remove(&key);
        }
        self.unmatched.extend(insert);
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

    /// The cold page reads an event needs before it can be decided: none while memory holds
    /// every event that could repeat it or be its partner. Those have its impression id and an
    /// event time within the join window of its own, so they arrived at or after
    /// `event_time − window − max_ahead`; memory holds every event that arrived at or after
    /// `cold_from`.
    pub fn lookups_for(
        &self,
        impression_id: &str,
        event_time_ms: i64,
        rules: &StateRules,
    ) -> Vec<Lookup> {
        let reach = rules.join.window_ms + rules.max_ahead_ms;
        if self.cold_from_ms == i64::MIN || event_time_ms - reach >= self.cold_from_ms {
            return Vec::new();
        }
        let bucket = bucket_of(impression_id);
        let (lo, hi) = (
            event_time_ms - rules.join.window_ms,
            event_time_ms + rules.join.window_ms,
        );
        LEVELS
            .iter()
            .filter_map(|&(level, size)| {
                let (first, last) = (lo.div_euclid(size), hi.div_euclid(size));
                let missing = (first..=last).any(|w| !self.looked_up.contains(&(bucket, level, w)));
                missing.then_some(Lookup {
                    bucket,
                    level,
                    first,
                    last,
                })
            })
            .collect()
    }

    /// Takes in the cold pages one lookup read. Their events are stored as they were (not as
    /// new), outside any batch's undo, and are dropped without being written again when their
    /// entry leaves memory.
    pub fn absorb_pages(&mut self, lookup: &Lookup, pages: &[Blob]) -> Result<(), PortError> {
        let undo = self.undo.take();
        for page in pages {
            for event in decode_events(&page.body)? {
                if !self.range.contains(bucket_of(event.impression_id())) {
                    continue;
                }
                let key = (
                    event.impression_id().to_owned(),
                    match &event {
                        Stored::Impression(..) => None,
                        Stored::Click(c, _) => Some(c.click_id.clone()),
                    },
                );
                let known = self.entries.get(&key.0).is_some_and(|e| match &key.1 {
                    None => e.impression.is_some(),
                    Some(c) => e.clicks.contains_key(c),
                });
                if !known {
                    self.store(event);
                    self.paged.insert(key);
                }
            }
        }
        self.undo = undo;
        for w in lookup.first..=lookup.last {
            self.looked_up.insert((lookup.bucket, lookup.level, w));
        }
        Ok(())
    }

    /// Events of pending outputs that arrived before `cold_from`: every slot writes them again
    /// with its events, so a rebuild from the warm slots can build every pending output.
    pub fn carried(&self) -> Vec<Stored> {
        if self.cold_from_ms == i64::MIN {
            return Vec::new();
        }
        let ids: BTreeSet<&str> = self.pending.iter().map(Pending::impression_id).collect();
        let mut out = Vec::new();
        for id in ids {
            let Some(entry) = self.entries.get(id) else {
                continue;
            };
            if let Some((imp, a)) = &entry.impression {
                if *a < self.cold_from_ms {
                    out.push(Stored::Impression(imp.clone(), *a));
                }
            }
            for (c, a) in entry.clicks.values() {
                if *a < self.cold_from_ms {
                    out.push(Stored::Click(c.clone(), *a));
                }
            }
        }
        out
    }

    /// Slot `n`, stamped `now_ms`, is written: it is the head.
    pub fn wrote(&mut self, n: u64, now_ms: i64) {
        self.head = Some(n);
        self.slot_times.insert(n, now_ms);
        self.wrote_in_batch = true;
    }

    /// Forgets the entries of the last eviction pass (its `cold_from` is now in a written slot),
    /// except those a pending output or a later event holds.
    fn drop_evicted(&mut self) {
        if self.to_drop.is_empty() {
            return;
        }
        let pinned: HashSet<String> = self
            .pending
            .iter()
            .map(|p| p.impression_id().to_owned())
            .collect();
        for id in std::mem::take(&mut self.to_drop) {
            // An event stored since the pass (one that arrived long ago, delivered late) is in
            // no page yet: its entry waits for the next pass.
            let droppable = self.entries.get(&id).is_some_and(|e| {
                e.last_arrival_ms < self.drop_before_ms
                    && e.impression
                        .as_ref()
                        .is_none_or(|_| self.paged.contains(&(id.clone(), None)))
                    && e.clicks
                        .keys()
                        .all(|c| self.paged.contains(&(id.clone(), Some(c.clone()))))
            });
            if !droppable || pinned.contains(&id) {
                continue;
            }
            if let Some(entry) = self.entries.remove(&id) {
                self.by_arrival.remove(&(entry.last_arrival_ms, id.clone()));
                self.paged.remove(&(id.clone(), None));
                for (c, a) in entry.clicks.into_values() {
                    self.unmatched.remove(&(a, id.clone(), c.click_id.clone()));
                    self.paged.remove(&(id.clone(), Some(c.click_id)));
                }
            }
        }
        self.looked_up.clear();
    }

    /// Whether the last batch wrote a slot of its own (which proves this writer holds the
    /// fence, and gives its eviction pages keys no other writer uses).
    pub fn wrote_in_batch(&self) -> bool {
        self.wrote_in_batch
    }

    /// Whether memory holds every event of the horizon (nothing was ever evicted).
    pub fn is_complete(&self) -> bool {
        self.cold_from_ms == i64::MIN
    }

    /// What the state records about eviction in the next slot.
    pub fn cold_marks(&self) -> (Option<i64>, Option<u64>) {
        (
            (self.cold_from_ms != i64::MIN).then_some(self.cold_from_ms),
            self.warm_from,
        )
    }

    /// Plans an eviction pass (call after a slot of this writer was written, with `slot` its
    /// number): entries whose latest arrival is a warm window old, except those with pending
    /// outputs, go to cold pages by bucket and event time; their clicks still waiting for a
    /// partner also go to a ledger item, swept when their retention ends. `None` while too
    /// few entries are old enough.
    pub fn plan_eviction(
        &self,
        rules: &StateRules,
        slot: u64,
        ttl_epoch_s: i64,
    ) -> Option<Eviction> {
        if rules.warm_ms <= 0 || self.now_ms == i64::MIN {
            return None;
        }
        let boundary = self.now_ms - rules.warm_ms;
        let pinned: BTreeSet<&str> = self.pending.iter().map(Pending::impression_id).collect();
        let old: Vec<&(i64, String)> = self
            .by_arrival
            .iter()
            .take_while(|(at, _)| *at < boundary)
            .filter(|(_, id)| !pinned.contains(id.as_str()))
            .collect();
        let oldest = old.first()?.0;
        if old.len() < rules.evict_min_entries.max(1) && oldest >= self.now_ms - 2 * rules.warm_ms {
            return None;
        }
        let ids: Vec<String> = old.iter().map(|(_, id)| id.clone()).collect();
        // Every event that arrived before the boundary goes to the pages, also in entries that
        // stay (a later event keeps them warm, or a pending output pins them): a rebuild reads
        // only the slots after the boundary. So does every click that arrived before it and
        // still waits for a partner, to the ledger, which sweeps it when its retention ends.
        let mut groups: BTreeMap<(u32, i64), Vec<Stored>> = BTreeMap::new();
        let mut waiting = Vec::new();
        let mut newly_paged = Vec::new();
        for (id, entry) in &self.entries {
            let bucket = bucket_of(id);
            let mut events = Vec::new();
            if let Some((imp, a)) = &entry.impression {
                if *a < boundary && !self.paged.contains(&(id.clone(), None)) {
                    events.push((None, Stored::Impression(imp.clone(), *a)));
                }
            }
            for (c, a) in entry.clicks.values() {
                if *a >= boundary {
                    continue;
                }
                if !self.paged.contains(&(id.clone(), Some(c.click_id.clone()))) {
                    events.push((Some(c.click_id.clone()), Stored::Click(c.clone(), *a)));
                }
                if self
                    .unmatched
                    .contains(&(*a, id.clone(), c.click_id.clone()))
                {
                    waiting.push(Stored::Click(c.clone(), *a));
                }
            }
            for (key, e) in events {
                let t = match &e {
                    Stored::Impression(i, _) => i.event_time_ms,
                    Stored::Click(c, _) => c.event_time_ms,
                };
                groups
                    .entry((bucket, t.div_euclid(3_600_000)))
                    .or_default()
                    .push(e);
                newly_paged.push((id.clone(), key));
            }
        }
        let range = self.range.lo * 100 + self.range.hi;
        let mut blobs = Vec::new();
        for ((bucket, hour), events) in groups {
            // A busy minute gets its own page; the rest of the hour shares one.
            let mut by_minute: BTreeMap<i64, Vec<Stored>> = BTreeMap::new();
            for e in events {
                let t = match &e {
                    Stored::Impression(i, _) => i.event_time_ms,
                    Stored::Click(c, _) => c.event_time_ms,
                };
                by_minute.entry(t.div_euclid(60_000)).or_default().push(e);
            }
            let mut pages: Vec<(u8, i64, Vec<Stored>)> = Vec::new();
            let mut rest = Vec::new();
            for (minute, events) in by_minute {
                if events.len() >= MINUTE_PAGE_MIN_EVENTS {
                    pages.push((LEVEL_MINUTE, minute, events));
                } else {
                    rest.extend(events);
                }
            }
            if !rest.is_empty() {
                pages.push((LEVEL_HOUR, hour, rest));
            }
            for (level, window, events) in pages {
                let mut bodies = Vec::new();
                encode_split(&events, &mut bodies);
                for (part, body) in bodies.into_iter().enumerate() {
                    blobs.push(Blob {
                        pk: page_pk(bucket),
                        sk: page_key(level, window, range, slot, part as u32),
                        body,
                        ttl_epoch_s,
                    });
                }
            }
        }
        let ledger = (!waiting.is_empty()).then(|| {
            let pk = ledger_pk(&self.log);
            let mut bodies = Vec::new();
            encode_split(&waiting, &mut bodies);
            for (part, body) in bodies.into_iter().enumerate() {
                blobs.push(Blob {
                    pk: pk.clone(),
                    sk: ledger_key(boundary, slot, part as u32),
                    body,
                    ttl_epoch_s,
                });
            }
            ((ledger_key(boundary, slot, 0), pk), waiting)
        });
        Some(Eviction {
            boundary_ms: boundary,
            blobs,
            ids,
            ledger,
            newly_paged,
        })
    }

    /// The pass's blobs are written: `cold_from` moves, and its entries leave memory after the
    /// next slot this writer writes.
    pub fn apply_eviction(&mut self, eviction: Eviction) {
        self.paged.extend(eviction.newly_paged);
        if let Some((_, clicks)) = &eviction.ledger {
            for e in clicks {
                if let Stored::Click(c, a) = e {
                    self.unmatched
                        .remove(&(*a, c.impression_id.clone(), c.click_id.clone()));
                }
            }
        }
        // The entries leave memory only once a slot of this writer records the new
        // `cold_from`: until then another writer that has not seen the eviction may decide an
        // output from them, and this writer, catching up, must still be able to build it.
        self.to_drop = eviction.ids;
        self.drop_before_ms = eviction.boundary_ms;
        if let Some((key, clicks)) = eviction.ledger {
            self.ledger.insert(key, clicks);
        }
        self.cold_from_ms = self.cold_from_ms.max(eviction.boundary_ms);
        self.looked_up.clear();
        let boundary = eviction.boundary_ms;
        let first_warm = self
            .slot_times
            .iter()
            .find(|(_, t)| **t >= boundary)
            .map(|(n, _)| *n)
            .or(self.head.map(|h| h + 1));
        if let Some(first) = first_warm {
            self.warm_from = Some(first);
            self.slot_times = self.slot_times.split_off(&first);
        }
    }

    /// Takes in ledger items (read at a rebuild or catch-up): their clicks are swept from the
    /// ledger, not from memory.
    pub fn absorb_ledger(&mut self, items: &[Blob]) -> Result<(), PortError> {
        for item in items {
            let clicks: Vec<Stored> = decode_events(&item.body)?
                .into_iter()
                .filter(|e| self.range.contains(bucket_of(e.impression_id())))
                .collect();
            for e in &clicks {
                if let Stored::Click(c, a) = e {
                    self.unmatched
                        .remove(&(*a, c.impression_id.clone(), c.click_id.clone()));
                }
            }
            if !clicks.is_empty() {
                self.ledger.insert((item.sk, item.pk.clone()), clicks);
            }
        }
        Ok(())
    }

    /// Where ledger items are read from at a rebuild: those not yet swept.
    pub fn ledger_span(&self, rules: &StateRules) -> (u128, u128) {
        let from = if self.swept_ms == i64::MIN {
            0
        } else {
            self.swept_ms - rules.join.retention_ms + 1
        };
        (ledger_key(from, 0, 0), KEY_MAX)
    }

    /// The latest ledger key known (a catch-up reads newer ones).
    pub fn ledger_last(&self, pk: &str) -> Option<u128> {
        self.ledger
            .keys()
            .filter(|(_, p)| p == pk)
            .map(|(k, _)| *k)
            .max()
    }

    /// The clicks whose retention has ended without a partner in memory, as of the clock:
    /// those waiting in memory and those of the ledger items now due. Check each with
    /// [`JoinMemory::has_partner`] after its lookups.
    pub fn orphan_candidates(&self, rules: &StateRules) -> Vec<OrphanClick> {
        let mut out = self.orphans(rules);
        let cutoff = self.now_ms.saturating_sub(rules.join.retention_ms);
        for ((key, _), clicks) in &self.ledger {
            if ledger_boundary(*key) >= cutoff {
                continue;
            }
            for e in clicks {
                if let Stored::Click(c, a) = e {
                    out.push(OrphanClick {
                        click: c.clone(),
                        arrival_ms: *a,
                    });
                }
            }
        }
        out
    }

    /// Whether a click has an impression it joins within the retention, in memory.
    pub fn has_partner(&self, click: &Click, arrival_ms: i64, rules: &StateRules) -> bool {
        self.entries
            .get(&click.impression_id)
            .and_then(|e| e.impression.as_ref())
            .is_some_and(|(imp, ia)| {
                attributes(&rules.join, imp, click)
                    && (ia - arrival_ms).abs() <= rules.join.retention_ms
            })
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
        self.ledger
            .retain(|(key, _), _| ledger_boundary(*key) >= cutoff);
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
    cold_marks: (Option<i64>, Option<u64>),
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
        cold_from_ms: cold_marks.0,
        warm_from: cold_marks.1,
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
    blobs: std::sync::Mutex<BTreeMap<(String, u128), Blob>>,
    logs: std::sync::Mutex<BTreeSet<String>>,
    acks: std::sync::Mutex<BTreeMap<String, u64>>,
    requests: std::sync::atomic::AtomicU64,
    write_units: std::sync::atomic::AtomicU64,
    read_units_x2: std::sync::atomic::AtomicU64,
    writes_by_kind: std::sync::Mutex<BTreeMap<&'static str, KindWrites>>,
}

/// Writes of one kind of item: how many, their bytes and write units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindWrites {
    pub items: u64,
    pub bytes: u64,
    pub units: u64,
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
        self.blobs
            .lock()
            .unwrap()
            .retain(|_, b| b.ttl_epoch_s >= now_epoch_s);
    }

    /// How many cold pages and ledger items are stored.
    pub fn blob_count(&self) -> usize {
        self.blobs.lock().unwrap().len()
    }

    pub fn slot_count(&self) -> usize {
        self.slots.lock().unwrap().len()
    }

    /// Writes so far by item kind: `slot`, `ack`, `register`, `page` (`cold#`), `ledger`
    /// (`orph#`).
    pub fn writes_by_kind(&self) -> BTreeMap<&'static str, KindWrites> {
        self.writes_by_kind.lock().unwrap().clone()
    }

    fn count_write(&self, kind: &'static str, bytes: usize) {
        let units = bytes.div_ceil(1024).max(1) as u64;
        self.write_units
            .fetch_add(units, std::sync::atomic::Ordering::Relaxed);
        let mut by_kind = self.writes_by_kind.lock().unwrap();
        let k = by_kind.entry(kind).or_default();
        k.items += 1;
        k.bytes += bytes as u64;
        k.units += units;
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
        self.count_write("slot", size);
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
        self.count_write(
            "register",
            "pk".len() + "logs".len() + "sk".len() + log.len(),
        );
        self.logs.lock().unwrap().insert(log.to_owned());
        Ok(())
    }

    async fn ack(&self, log: &str, n: u64) -> Result<(), PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        self.count_write(
            "ack",
            "pk".len() + "ack#".len() + log.len() + "n".len() + 21,
        );
        self.acks.lock().unwrap().insert(log.to_owned(), n);
        Ok(())
    }

    async fn acked(&self, log: &str) -> Result<Option<u64>, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        self.read_units_x2.fetch_add(2, Relaxed);
        Ok(self.acks.lock().unwrap().get(log).copied())
    }

    async fn last(&self, log: &str) -> Result<Option<Slot>, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        let slot = self
            .slots
            .lock()
            .unwrap()
            .range((log.to_owned(), 0)..=(log.to_owned(), u64::MAX))
            .next_back()
            .map(|(_, s)| s.clone());
        let bytes = slot.as_ref().map_or(0, |s| slot_item_size(log, s));
        self.requests.fetch_add(1, Relaxed);
        self.read_units_x2
            .fetch_add(bytes.div_ceil(4096).max(1) as u64 * 2, Relaxed);
        Ok(slot)
    }

    async fn put_blob(&self, blob: &Blob) -> Result<(), PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        let size = blob_item_size(blob);
        if size > DYNAMODB_ITEM_LIMIT {
            return Err(PortError::Rejected(format!(
                "ValidationException: Item size has exceeded the maximum allowed size ({size} bytes)"
            )));
        }
        let kind = if blob.pk.starts_with("cold#") {
            "page"
        } else {
            "ledger"
        };
        self.count_write(kind, size);
        self.blobs
            .lock()
            .unwrap()
            .insert((blob.pk.clone(), blob.sk), blob.clone());
        Ok(())
    }

    async fn blobs(&self, pk: &str, lo: u128, hi: u128) -> Result<Vec<Blob>, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        let found: Vec<Blob> = self
            .blobs
            .lock()
            .unwrap()
            .range((pk.to_owned(), lo)..=(pk.to_owned(), hi))
            .map(|(_, b)| b.clone())
            .collect();
        let bytes: usize = found.iter().map(blob_item_size).sum();
        self.requests
            .fetch_add(1 + (bytes / (1024 * 1024)) as u64, Relaxed);
        self.read_units_x2
            .fetch_add(bytes.div_ceil(4096).max(1) as u64 * 2, Relaxed);
        Ok(found)
    }
}

/// The size DynamoDB counts for a blob item.
pub fn blob_item_size(blob: &Blob) -> usize {
    "pk".len() + blob.pk.len() + "sk".len() + 21 + "ttl".len() + 21 + "d".len() + blob.body.len()
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
    fn last(&self, log: &str) -> impl Future<Output = Result<Option<Slot>, PortError>> + Send {
        (**self).last(log)
    }
    fn put_blob(&self, blob: &Blob) -> impl Future<Output = Result<(), PortError>> + Send {
        (**self).put_blob(blob)
    }
    fn blobs(
        &self,
        pk: &str,
        lo: u128,
        hi: u128,
    ) -> impl Future<Output = Result<Vec<Blob>, PortError>> + Send {
        (**self).blobs(pk, lo, hi)
    }
}
