//! What the join state holds: stored events, pending outputs, log slots and blobs, the state's
//! rules and what one event's decision comes to.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::join::rule::{JoinRules, LatePair};
use crate::model::{Click, Event, Impression};

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
    /// An arriving event, to be stored with its arrival.
    pub fn of(event: &Event, arrival_ms: i64) -> Self {
        match event {
            Event::Impression(i) => Stored::Impression(i.clone(), arrival_ms),
            Event::Click(c) => Stored::Click(c.clone(), arrival_ms),
        }
    }

    /// The event's own time, epoch ms.
    pub fn event_time_ms(&self) -> i64 {
        match self {
            Stored::Impression(i, _) => i.event_time_ms,
            Stored::Click(c, _) => c.event_time_ms,
        }
    }

    pub fn impression_id(&self) -> &str {
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
    /// The last slot of the batch, when it spans several (absent: the batch is this slot).
    /// The slots are written one by one, so a batch whose last slot is missing stopped part
    /// way (a throttle, a lost answer, a crash between two puts): readers take nothing of it,
    /// and its redo is decided again into the slots after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_last: Option<u64>,
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

/// A stored blob beside the log: a page of evicted events (`cold#<bucket>`) or a ledger item
/// of evicted clicks still waiting for a partner (`orph#<log>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub pk: String,
    pub sk: u128,
    pub body: Vec<u8>,
    pub ttl_epoch_s: i64,
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
pub(super) struct Entry {
    pub(super) impression: Option<(Impression, i64)>,
    pub(super) clicks: BTreeMap<String, (Click, i64)>,
    pub(super) last_arrival_ms: i64,
}
