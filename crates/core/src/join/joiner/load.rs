//! Loading a range's memory from the log: a rebuild from the warm slots (its own log's and its
//! parents'), catching up with another writer's slots, and reading cold pages and the orphan
//! ledger.

use std::collections::{BTreeSet, HashSet};

use crate::join::buckets::BucketRange;
use crate::join::state::{decode_body, ledger_pk, JoinMemory, Lookup, Slot};
use crate::ports::{DeadLetterSink, PortError, RecordSink, ShardRanges, StateLog};

use super::{Held, KeyedJoiner};

impl<L: StateLog, R: ShardRanges, K: RecordSink, D: DeadLetterSink> KeyedJoiner<L, R, K, D> {
    /// The slots a rebuild reads from a log: from the `warm_from` its newest slot names (every
    /// earlier event is in the cold pages), or all of them.
    pub(super) async fn warm_slots(&self, log: &str) -> Result<Vec<Slot>, PortError> {
        let Some(last) = self.log.last(log).await? else {
            return Ok(Vec::new());
        };
        let from = decode_body(&last.body)?.warm_from.unwrap_or(0).min(last.n);
        self.log.read(log, from).await
    }

    /// Reads the ledger items of `log` newer than `after` (not yet swept) into memory.
    pub(super) async fn read_ledger(
        &self,
        memory: &mut JoinMemory,
        log: &str,
        after: Option<u128>,
    ) -> Result<(), PortError> {
        let (lo, hi) = memory.ledger_span(&self.rules);
        let lo = after.map_or(lo, |a| lo.max(a + 1));
        let items = self.log.blobs(&ledger_pk(log), lo, hi).await?;
        memory.absorb_ledger(&items)
    }

    pub(super) async fn rebuild(&self, range: BucketRange, shard: &str) -> Result<Held, PortError> {
        let own = range.log_id();
        let logs = self.log.logs().await?;
        if !logs.contains(&own) {
            self.log.register(&own).await?;
        }
        let mut others = Vec::new();
        for log in logs.iter().filter(|l| **l != own) {
            if BucketRange::from_log_id(log).is_some_and(|r| r.overlaps(&range)) {
                let slots = self.warm_slots(log).await?;
                others.push((log.clone(), slots, self.log.acked(log).await?));
            }
        }
        let slots = self.warm_slots(&own).await?;
        let acked = self.log.acked(&own).await?;
        let mut memory = JoinMemory::rebuild(range, shard, &self.rules, &slots, &others, acked)?;
        for (log, _, _) in &others {
            self.read_ledger(&mut memory, log, None).await?;
        }
        self.read_ledger(&mut memory, &own, None).await?;
        let maybe_sent = memory.pending().cloned().collect();
        Ok(Held { memory, maybe_sent })
    }

    /// Reads what other writers added to this range's log since this memory's head. A memory
    /// whose head is older than the log's warm slots (another writer has since moved entries
    /// to the cold pages) is rebuilt instead: the warm slots are what a rebuild reads, and
    /// reading every slot since a stale head could be hours of them. `Ok(true)`: rebuilt.
    pub(super) async fn catch_up(&self, held: &mut Held) -> Result<bool, PortError> {
        let from = held.memory.head.map_or(0, |h| h + 1);
        if let Some(last) = self.log.last(&held.memory.log).await? {
            let warm_from = decode_body(&last.body)?.warm_from.unwrap_or(0);
            if warm_from > from {
                let (range, shard) = (held.memory.range, held.memory.shard().to_owned());
                *held = self.rebuild(range, &shard).await?;
                return Ok(true);
            }
        }
        let mut slots = self.log.read(&held.memory.log, from).await?;
        // A batch that spans several slots is read from its first.
        if let Some(last) = slots.last() {
            let first = decode_body(&last.body)?.batch_first;
            if first < from {
                slots = self.log.read(&held.memory.log, first).await?;
            }
        }
        let acked = self.log.acked(&held.memory.log).await?;
        held.memory.catch_up(&self.rules, &slots, acked)?;
        // The other writer may have evicted entries and recorded their waiting clicks.
        let log = held.memory.log.clone();
        let known = held.memory.ledger_last(&ledger_pk(&log));
        self.read_ledger(&mut held.memory, &log, known).await?;
        held.maybe_sent = held.memory.pending().cloned().collect();
        Ok(false)
    }

    /// Reads the cold pages of these lookups into memory: whole while memory stays within its
    /// budget, else only the events of the `wanted` impression ids.
    pub(super) async fn load_cold(
        &self,
        memory: &mut JoinMemory,
        lookups: BTreeSet<Lookup>,
        wanted: &HashSet<String>,
    ) -> Result<(), PortError> {
        for lookup in lookups {
            let (lo, hi) = lookup.key_span();
            let pages = self.log.blobs(&lookup.pk(), lo, hi).await?;
            memory.absorb_pages(&lookup, &pages, wanted, self.rules.max_entries)?;
        }
        Ok(())
    }
}
