//! Cold pages: events that left the warm window, stored by bucket and event time (a minute
//! page for a busy bucket-minute, an hour page otherwise), and read back when a late event
//! needs them.

use std::collections::{BTreeSet, HashSet};

use crate::join::buckets::bucket_of;
use crate::ports::PortError;

use super::memory::JoinMemory;
use super::model::{Blob, Pending, StateRules, Stored, MAX_SLOT_BODY_BYTES};

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

pub(super) const LEVELS: [(u8, i64); 2] = [(LEVEL_MINUTE, 60_000), (LEVEL_HOUR, 3_600_000)];

/// A bucket-minute evicted with at least this many events in one pass gets a page of its own,
/// so a lookup in a busy bucket reads a minute, not an hour; sparser minutes share their
/// hour's page, so pages stay full.
pub const MINUTE_PAGE_MIN_EVENTS: usize = 64;

pub(super) const PAGE_SLOT_MOD: u64 = 1_000_000_000_000;

pub(super) const PAGE_PARTS: u32 = 1_000;

/// The partition of a bucket's cold pages.
pub fn page_pk(bucket: u32) -> String {
    format!("cold#{bucket}")
}

/// A page's key: level, window, its writer (the log's range and the slot the writer had just
/// written, which no other writer can have written) and its part. 28 digits at most, within
/// DynamoDB's 38 for a number.
pub(super) fn page_key(level: u8, window: i64, range: u32, slot: u64, part: u32) -> u128 {
    let mut k = u128::from(level);
    k = k * 100_000_000 + window.clamp(0, 99_999_999) as u128;
    k = k * 10_000 + u128::from(range.min(9_999));
    k = k * u128::from(PAGE_SLOT_MOD) + u128::from(slot % PAGE_SLOT_MOD);
    k * u128::from(PAGE_PARTS) + u128::from(part.min(PAGE_PARTS - 1))
}

/// Above every blob key (and within DynamoDB's 38 digits).
pub(super) const KEY_MAX: u128 = 10u128.pow(30);

/// Compresses a page of events (column-wise, [`crate::codec`], then zstd). Pages are written
/// once per eviction pass, so they take zstd's stronger levels.
pub fn encode_events(events: &[Stored]) -> Vec<u8> {
    super::codec::encode_events(events, PAGE_ZSTD_LEVEL)
}

const PAGE_ZSTD_LEVEL: i32 = 19;

/// Reads a page of events back (either format: column-wise, or JSON from earlier versions).
pub fn decode_events(bytes: &[u8]) -> Result<Vec<Stored>, PortError> {
    let raw = zstd::stream::decode_all(bytes)
        .map_err(|e| PortError::Corrupt(format!("page is not zstd: {e}")))?;
    if raw.starts_with(super::codec::EVENTS_MAGIC) {
        return super::codec::decode_events(&raw);
    }
    serde_json::from_slice(&raw)
        .map_err(|e| PortError::Corrupt(format!("page is not a list of events: {e}")))
}

/// Splits events into compressed bodies of at most [`MAX_SLOT_BODY_BYTES`].
pub(super) fn encode_split(events: &[Stored], out: &mut Vec<Vec<u8>>) {
    let body = encode_events(events);
    if events.len() <= 1 || body.len() <= MAX_SLOT_BODY_BYTES {
        out.push(body);
        return;
    }
    let (a, b) = events.split_at(events.len() / 2);
    encode_split(a, out);
    encode_split(b, out);
}

impl JoinMemory {
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
    /// entry leaves memory. Whole pages while memory stays within `max_entries` with them (the
    /// lookup's windows are then known, and later events of them read nothing); past it, only
    /// the events of the impression ids in `wanted` (those being decided), and the windows stay
    /// unread for the next lookup. So a memory the budget already holds to less than its warm
    /// window is not filled again by the pages of one batch.
    pub fn absorb_pages(
        &mut self,
        lookup: &Lookup,
        pages: &[Blob],
        wanted: &HashSet<String>,
        max_entries: usize,
    ) -> Result<(), PortError> {
        let mut events = Vec::new();
        for page in pages {
            events.extend(decode_events(&page.body)?);
        }
        let whole = self.entries.len().saturating_add(events.len()) <= max_entries;
        let undo = self.undo.take();
        for event in events {
            if !self.range.contains(bucket_of(event.impression_id())) {
                continue;
            }
            if !whole && !wanted.contains(event.impression_id()) {
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
        self.undo = undo;
        if whole {
            for w in lookup.first..=lookup.last {
                self.looked_up.insert((lookup.bucket, lookup.level, w));
            }
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
}
