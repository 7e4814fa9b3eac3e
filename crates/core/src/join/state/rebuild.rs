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
        // The slots of a batch that stopped part way are numbered, never taken in.
        let physical_head = bodies.last().map(|(n, _)| *n);
        let bodies = complete_batches(bodies);
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
        self.head = self.head.max(physical_head);
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
            memory.absorb(&complete_batches(bodies), false, *their_ack);
        }
        let mut bodies = Vec::new();
        for slot in own {
            bodies.push((slot.n, decode_body(&slot.body)?));
        }
        // A batch that stopped part way leaves numbered slots: the next is numbered after them.
        let physical_head = bodies.last().map(|(n, _)| *n);
        memory.absorb(&complete_batches(bodies), true, acked);
        memory.head = memory.head.max(physical_head);
        // Slots are never numbered at or below the acknowledgement: once TTL has deleted an
        // idle range's slots its acknowledgement stays, and a new batch numbered from 0 would
        // be taken as acknowledged, its outputs as sent.
        memory.head = memory.head.max(acked);
        memory.expire(rules);
        memory.rebuild_unmatched(rules);
        Ok(memory)
    }

    /// Takes in a log's slots (in order, complete batches only). Their newest batch's pending
    /// outputs are pending here unless the log's acknowledgement covers them.
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

/// The slots of `bodies` (in order) whose batch is complete. A batch's slots are written one by
/// one; one whose last slot (`batch_last`) is not there stopped part way and never emitted
/// anything, so none of its events, pending outputs or progress count: its redo decides the
/// batch again, into the slots after it. A batch cut off at the front (the read began inside
/// it) is complete all the same if its last slot is there.
pub(super) fn complete_batches(bodies: Vec<(u64, SlotBody)>) -> Vec<(u64, SlotBody)> {
    let mut out: Vec<(u64, SlotBody)> = Vec::with_capacity(bodies.len());
    let mut group: Vec<(u64, SlotBody)> = Vec::new();
    let flush = |group: &mut Vec<(u64, SlotBody)>, out: &mut Vec<(u64, SlotBody)>| {
        let complete = group
            .last()
            .is_some_and(|(n, b)| b.batch_last.is_none_or(|last| *n == last));
        if complete {
            out.append(group);
        } else {
            group.clear();
        }
    };
    for (n, body) in bodies {
        let same = group.last().is_some_and(|(prev, b)| {
            b.batch_first == body.batch_first && *prev + 1 == n && b.batch_last == body.batch_last
        });
        if !same {
            flush(&mut group, &mut out);
        }
        group.push((n, body));
    }
    flush(&mut group, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(n: u64, first: u64, last: Option<u64>) -> (u64, SlotBody) {
        (
            n,
            SlotBody {
                v: super::super::model::SLOT_FORMAT,
                shard: "s".into(),
                progress: None,
                batch_first: first,
                batch_last: last,
                now_ms: 0,
                swept_ms: 0,
                events: Vec::new(),
                pending: Vec::new(),
                cold_from_ms: None,
                warm_from: None,
            },
        )
    }

    fn numbers(bodies: Vec<(u64, SlotBody)>) -> Vec<u64> {
        complete_batches(bodies)
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn a_batch_whose_last_slot_is_missing_is_left_out_wherever_it_is() {
        // Single-slot batches, a complete three-slot batch, a stopped one, its redo.
        let log = vec![
            slot(0, 0, None),
            slot(1, 1, Some(3)),
            slot(2, 1, Some(3)),
            slot(3, 1, Some(3)),
            slot(4, 4, Some(6)),
            slot(5, 4, Some(6)),
            slot(6, 6, Some(7)),
            slot(7, 6, Some(7)),
            slot(8, 8, None),
        ];
        assert_eq!(numbers(log.clone()), vec![0, 1, 2, 3, 6, 7, 8]);
        // Stopped at the head: nothing of it.
        assert_eq!(numbers(log[..6].to_vec()), vec![0, 1, 2, 3]);
        assert_eq!(numbers(log[..2].to_vec()), vec![0]);
        // Read from inside a batch: complete if its last slot is there.
        assert_eq!(numbers(log[2..4].to_vec()), vec![2, 3]);
        assert_eq!(numbers(log[5..].to_vec()), vec![6, 7, 8]);
    }
}
