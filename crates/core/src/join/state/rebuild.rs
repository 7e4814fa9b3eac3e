//! Building a range's memory from its log: a rebuild after a cold start (from the warm slots of
//! its own and its parents' logs), and catching up with slots another writer added.

use std::collections::{BTreeSet, HashSet};

use crate::join::buckets::{bucket_of, BucketRange};
use crate::join::rule::attributes;

use crate::ports::PortError;

use super::memory::JoinMemory;
use super::model::{Slot, SlotBody, StateRules, Stored};
use super::slots::decode_body;

impl JoinMemory {
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
        // Slots are never numbered at or below the acknowledgement: once TTL has deleted an
        // idle range's slots its acknowledgement stays, and a new batch numbered from 0 would
        // be taken as acknowledged, its outputs as sent.
        memory.head = memory.head.max(acked);
        memory.expire(rules);
        memory.rebuild_unmatched(rules);
        Ok(memory)
    }

    /// Takes in a log's slots (in order). Their newest batch's pending outputs are pending here
    /// unless the log's acknowledgement covers them.
    pub(super) fn absorb(&mut self, bodies: &[(u64, SlotBody)], own: bool, acked: Option<u64>) {
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

    pub(super) fn rebuild_unmatched(&mut self, rules: &StateRules) {
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
    pub(super) fn refresh_unmatched(&mut self, ids: &BTreeSet<String>, rules: &StateRules) {
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
}
