//! Eviction: entries a warm window old move to cold pages (their waiting clicks to the orphan
//! ledger), and leave memory once a slot of this writer records the new boundary.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::join::buckets::bucket_of;

use super::memory::JoinMemory;
use super::model::{Blob, Pending, StateRules, Stored};
use super::orphans::{ledger_key, ledger_pk};
use super::pages::{
    encode_split, page_key, page_pk, LEVEL_HOUR, LEVEL_MINUTE, MINUTE_PAGE_MIN_EVENTS,
};

/// What one eviction pass writes and then forgets.
#[derive(Debug, Clone, Default)]
pub struct Eviction {
    pub boundary_ms: i64,
    /// Cold pages, then the ledger item (if any evicted click still waits for a partner).
    pub blobs: Vec<Blob>,
    pub(super) ids: Vec<String>,
    pub(super) ledger: Option<((u128, String), Vec<Stored>)>,
    pub(super) newly_paged: Vec<(String, Option<String>)>,
    /// Whether the memory budget moved the boundary ahead of the warm window: entries left
    /// memory before their warm window ended.
    pub early: bool,
}

impl Eviction {
    /// How many entries (impression ids) it moves.
    pub fn entries(&self) -> usize {
        self.ids.len()
    }
}

impl JoinMemory {
    /// Forgets the entries of the last eviction pass (its `cold_from` is now in a written slot),
    /// except those a pending output or a later event holds.
    pub(super) fn drop_evicted(&mut self) {
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
        if self.now_ms == i64::MIN {
            return None;
        }
        // A warm window of 0 keeps the horizon in memory: only the budget moves entries.
        let by_age = if rules.warm_ms > 0 {
            self.now_ms - rules.warm_ms
        } else {
            i64::MIN
        };
        let (boundary, early) = match self.budget_boundary(rules) {
            Some(b) if b > by_age => (b, true),
            _ => (by_age, false),
        };
        let ids = self.old_entries(rules, boundary, early)?;
        let old = self.events_before(boundary);
        let writer = self.range.lo * 100 + self.range.hi;
        let mut blobs = Vec::new();
        for ((bucket, hour), events) in old.by_bucket_hour {
            let at = |level, window, part| page_key(level, window, writer, slot, part);
            for (level, window, events) in pages_of_hour(hour, events) {
                push_parts(&mut blobs, &page_pk(bucket), &events, ttl_epoch_s, |part| {
                    at(level, window, part)
                });
            }
        }
        let waiting = old.waiting;
        let ledger = (!waiting.is_empty()).then(|| {
            let pk = ledger_pk(&self.log);
            push_parts(&mut blobs, &pk, &waiting, ttl_epoch_s, |part| {
                ledger_key(boundary, slot, part)
            });
            ((ledger_key(boundary, slot, 0), pk), waiting)
        });
        Some(Eviction {
            boundary_ms: boundary,
            blobs,
            ids,
            ledger,
            newly_paged: old.newly_paged,
            early,
        })
    }

    /// Past the memory budget (`max_entries`, the environment's), the boundary that leaves
    /// three quarters of it in memory: the arrival of the oldest entry that stays. Memory then
    /// holds less than the warm window, and events whose partners left it read the cold pages
    /// (see [`JoinMemory::absorb_pages`], which keeps to the budget as well). `None` while
    /// memory is within the budget.
    fn budget_boundary(&self, rules: &StateRules) -> Option<i64> {
        if self.entries.len() <= rules.max_entries {
            return None;
        }
        let keep = rules.max_entries - rules.max_entries / 4;
        let excess = self.entries.len() - keep;
        self.by_arrival.iter().nth(excess).map(|(at, _)| *at)
    }

    /// The entries an eviction moves: those whose latest arrival is before `boundary` and
    /// that no pending output pins. `None` while they are fewer than the rules' minimum and
    /// the oldest is less than two warm windows old (unless the budget moved the boundary).
    fn old_entries(&self, rules: &StateRules, boundary: i64, early: bool) -> Option<Vec<String>> {
        let pinned: BTreeSet<&str> = self.pending.iter().map(Pending::impression_id).collect();
        let old: Vec<&(i64, String)> = self
            .by_arrival
            .iter()
            .take_while(|(at, _)| *at < boundary)
            .filter(|(_, id)| !pinned.contains(id.as_str()))
            .collect();
        let oldest = old.first()?.0;
        let wait = !early && old.len() < rules.evict_min_entries.max(1);
        if wait && oldest >= self.now_ms - 2 * rules.warm_ms {
            return None;
        }
        Some(old.iter().map(|(_, id)| id.clone()).collect())
    }

    /// Every event that arrived before the boundary goes to the pages, also in entries that
    /// stay (a later event keeps them warm, or a pending output pins them): a rebuild reads
    /// only the slots after the boundary. So does every click that arrived before it and
    /// still waits for a partner, to the ledger, which sweeps it when its retention ends.
    fn events_before(&self, boundary: i64) -> OldEvents {
        let mut old = OldEvents::default();
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
                    old.waiting.push(Stored::Click(c.clone(), *a));
                }
            }
            for (key, e) in events {
                let hour = e.event_time_ms().div_euclid(3_600_000);
                old.by_bucket_hour
                    .entry((bucket, hour))
                    .or_default()
                    .push(e);
                old.newly_paged.push((id.clone(), key));
            }
        }
        old
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
}

/// The events an eviction pass writes out.
#[derive(Default)]
struct OldEvents {
    /// Events not yet in a page, by (bucket, event hour).
    by_bucket_hour: BTreeMap<(u32, i64), Vec<Stored>>,
    /// Clicks still waiting for a partner, for the ledger.
    waiting: Vec<Stored>,
    /// (impression id, click id or `None`) of every event going to a page.
    newly_paged: Vec<(String, Option<String>)>,
}

/// The pages of one bucket-hour: a busy minute gets its own page; the rest of the hour
/// shares one.
fn pages_of_hour(hour: i64, events: Vec<Stored>) -> Vec<(u8, i64, Vec<Stored>)> {
    let mut by_minute: BTreeMap<i64, Vec<Stored>> = BTreeMap::new();
    for e in events {
        by_minute
            .entry(e.event_time_ms().div_euclid(60_000))
            .or_default()
            .push(e);
    }
    let mut pages = Vec::new();
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
    pages
}

/// Writes `events` as blobs of partition `pk`, in as many parts as the item limit needs,
/// keyed by `key(part)`.
fn push_parts(
    blobs: &mut Vec<Blob>,
    pk: &str,
    events: &[Stored],
    ttl_epoch_s: i64,
    key: impl Fn(u32) -> u128,
) {
    let mut bodies = Vec::new();
    encode_split(events, &mut bodies);
    for (part, body) in bodies.into_iter().enumerate() {
        blobs.push(Blob {
            pk: pk.to_owned(),
            sk: key(part as u32),
            body,
            ttl_epoch_s,
        });
    }
}
