//! After a batch is written: clicks whose retention ended without a partner are recorded,
//! old entries move to cold pages, and the environment keeps to its memory budget.

use std::collections::{BTreeSet, HashSet};

use crate::dead_letter;
use crate::join::input::{BatchReport, FUNCTION};
use crate::join::state::Lookup;
use crate::ports::{DeadLetter, DeadLetterSink, RecordSink, ShardRanges, StateLog};

use super::{put_all, Held, KeyedJoiner};

impl<L: StateLog, R: ShardRanges, K: RecordSink, D: DeadLetterSink> KeyedJoiner<L, R, K, D> {
    /// Records the clicks whose retention ended without a partner (after the batch is written,
    /// so only written state is judged). A failed write leaves them for the next batch.
    pub(super) async fn sweep_orphans(&self, held: &mut Held, report: &mut BatchReport) {
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
        let wanted: HashSet<String> = candidates
            .iter()
            .map(|o| o.click.impression_id.clone())
            .collect();
        if let Err(e) = self.load_cold(&mut held.memory, lookups, &wanted).await {
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
        let written = put_all(&letters, self.config.max_in_flight, |l| {
            self.dead_letters.put(l)
        })
        .await;
        match written {
            Err(e) => {
                tracing::warn!(error = %e, "orphan records not written; retried with the next batch")
            }
            Ok(()) => {
                report.counts.orphaned += orphans.len() as u64;
                held.memory.swept(&rules);
            }
        }
    }

    /// Moves the entries a warm window old to cold pages (after this writer wrote a slot,
    /// which proves it holds the fence). The pages are written before memory forgets anything;
    /// a failed write leaves memory as it was, for the next batch to try again.
    pub(super) async fn evict(&self, held: &mut Held, report: &mut BatchReport) {
        let Some(head) = held.memory.head else {
            return;
        };
        let ttl = self.ttl_epoch_s(held.memory.now_ms());
        let Some(eviction) = held.memory.plan_eviction(&self.rules, head, ttl) else {
            return;
        };
        let written = put_all(&eviction.blobs, self.config.max_in_flight, |b| {
            self.log.put_blob(b)
        })
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "cold pages not written; the entries stay in memory");
            return;
        }
        report.counts.evicted += eviction.entries() as u64;
        if eviction.early {
            report.counts.spilled_early += eviction.entries() as u64;
            tracing::info!(
                entries = held.memory.events(),
                max_entries = self.rules.max_entries,
                moved = eviction.entries(),
                "memory budget passed: entries left memory for the cold pages before their warm window ended"
            );
        }
        held.memory.apply_eviction(eviction);
    }

    /// Lambda does not pin a shard to an environment, so one environment may come to hold the
    /// memory of several shards. The budget is the environment's: when the memories of the
    /// other shards and this one's pass it, the idle ones are dropped (a later batch of theirs
    /// rebuilds from the log, as on a cold start).
    pub(super) async fn trim_other_shards(&self, shard: &str, own: usize) {
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
}
