//! Orphan clicks: clicks whose retention ended without a partner are recorded, from memory or
//! from the ledger items an eviction wrote for clicks still waiting.

use crate::join::buckets::bucket_of;
use crate::join::rule::attributes;
use crate::model::Click;
use crate::ports::PortError;

use super::memory::JoinMemory;
use super::model::{Blob, OrphanClick, StateRules, Stored};
use super::pages::{decode_events, KEY_MAX, PAGE_PARTS, PAGE_SLOT_MOD};

/// The partition of a log's ledger items.
pub fn ledger_pk(log: &str) -> String {
    format!("orph#{log}")
}

/// A ledger item's key: the eviction boundary, the writer's slot, the part (28 digits at
/// most).
pub(super) fn ledger_key(boundary_ms: i64, slot: u64, part: u32) -> u128 {
    let k =
        boundary_ms.max(0) as u128 * u128::from(PAGE_SLOT_MOD) + u128::from(slot % PAGE_SLOT_MOD);
    k * u128::from(PAGE_PARTS) + u128::from(part.min(PAGE_PARTS - 1))
}

pub(super) fn ledger_boundary(key: u128) -> i64 {
    (key / u128::from(PAGE_SLOT_MOD) / u128::from(PAGE_PARTS)) as i64
}

impl JoinMemory {
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
}
