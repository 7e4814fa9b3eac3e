//! One writer's state of one bucket range in memory, and the batch transaction around it:
//! `begin`, then the batch's decisions, then `commit` or `rollback`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::join::buckets::BucketRange;
use crate::model::sequence_cmp;

use super::model::{Entry, Pending, StateRules, Stored};

/// One writer's state of one bucket range, in memory.
#[derive(Debug, Clone)]
pub struct JoinMemory {
    pub log: String,
    pub range: BucketRange,
    /// The last slot number of the log, if any.
    pub head: Option<u64>,
    pub(super) shard: String,
    pub(super) progress: Option<String>,
    pub(super) entries: HashMap<String, Entry>,
    pub(super) by_arrival: BTreeSet<(i64, String)>,
    pub(super) unmatched: BTreeSet<(i64, String, String)>,
    pub(super) swept_ms: i64,
    pub(super) now_ms: i64,
    pub(super) pending: BTreeSet<Pending>,
    pub(super) undo: Option<Undo>,
    /// See [`SlotBody::cold_from_ms`]; `i64::MIN` while memory holds everything.
    pub(super) cold_from_ms: i64,
    /// See [`SlotBody::warm_from`].
    pub(super) warm_from: Option<u64>,
    /// The warm slots' clocks (slot number → `now_ms`), to find `warm_from` at an eviction.
    pub(super) slot_times: BTreeMap<u64, i64>,
    /// Events known to be in the cold pages (read back from them, or written by an eviction
    /// while their entry stayed warm): an eviction does not write them again.
    pub(super) paged: HashSet<(String, Option<String>)>,
    /// Cold page windows already read into memory: (bucket, level, window).
    pub(super) looked_up: HashSet<(u32, u8, i64)>,
    /// Ledger items not yet swept: clicks evicted while waiting for a partner, by ledger key.
    pub(super) ledger: BTreeMap<(u128, String), Vec<Stored>>,
    /// The last eviction pass's entries, forgotten once a slot records its `cold_from`.
    pub(super) to_drop: Vec<String>,
    pub(super) drop_before_ms: i64,
    /// Whether the current batch wrote a slot.
    pub(super) wrote_in_batch: bool,
}

/// What a batch changed in memory, so an attempt whose slot was taken can be taken back.
#[derive(Debug, Clone, Default)]
pub(super) struct Undo {
    /// (impression id, click id or `None` for the impression, entry was new, previous latest
    /// arrival), in the order stored.
    pub(super) stored: Vec<(String, Option<String>, bool, i64)>,
    pub(super) unmatched_added: Vec<(i64, String, String)>,
    pub(super) unmatched_removed: Vec<(i64, String, String)>,
    pub(super) pending_added: Vec<Pending>,
    pub(super) progress: Option<String>,
    pub(super) now_ms: i64,
    /// The head before the batch.
    pub(super) head: Option<u64>,
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
            head: self.head,
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
        // Slots this batch wrote before it stopped stay numbered (the head stays at them, so
        // the redo writes after them), but they hold nothing a reader takes in (see
        // `complete_batches`): no eviction may start its warm slots there.
        if let Some(first_new) = undo.head.map_or(Some(0), |h| h.checked_add(1)) {
            self.slot_times.split_off(&first_new);
        }
    }

    pub(super) fn store(&mut self, event: Stored) {
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
    pub(super) fn expire(&mut self, rules: &StateRules) {
        let cutoff = self.now_ms.saturating_sub(rules.dedup_horizon_ms);
        while let Some((at, id)) = self.by_arrival.first().cloned() {
            if at >= cutoff {
                break;
            }
            self.by_arrival.pop_first();
            self.entries.remove(&id);
        }
    }

    /// Slot `n`, stamped `now_ms`, is written: it is the head.
    pub fn wrote(&mut self, n: u64, now_ms: i64) {
        self.head = Some(n);
        self.slot_times.insert(n, now_ms);
        self.wrote_in_batch = true;
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

    /// The keyed-stream shard this memory writes for.
    pub fn shard(&self) -> &str {
        &self.shard
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

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn add_pending(&mut self, p: Pending) {
        if self.pending.insert(p.clone()) {
            if let Some(undo) = self.undo.as_mut() {
                undo.pending_added.push(p);
            }
        }
    }

    pub(super) fn add_unmatched(&mut self, u: (i64, String, String)) {
        if self.unmatched.insert(u.clone()) {
            if let Some(undo) = self.undo.as_mut() {
                undo.unmatched_added.push(u);
            }
        }
    }

    pub(super) fn remove_unmatched(&mut self, u: &(i64, String, String)) {
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
}
