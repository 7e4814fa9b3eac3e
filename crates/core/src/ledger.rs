//! The commit ledger: which input ranges of the joined stream a lake table has landed, kept
//! in the table's own metadata (a table property) and bounded by construction.
//!
//! The lake's exactly-once argument needs two answers for every batch it is given:
//! - *was exactly this batch committed?* (a retried batch whose commit landed is skipped);
//! - *may this batch share records with one that was?* (a re-split retry or a replay from an
//!   old position: then every row is checked against the table's keys before it lands).
//!
//! The ledger answers both without walking the snapshot history, so snapshots can expire
//! after a few commits whatever the stream's retention. Per stream shard it keeps:
//! - the ids of the last [`LedgerLimits::recent_batches`] committed batches (the exact
//!   answer for a retry, which comes within seconds of its first attempt);
//! - at most [`LedgerLimits::ranges_per_shard`] sequence ranges covering everything committed.
//!   When there would be more, the two lowest neighbours are merged into one range spanning
//!   both. A merged range may cover sequence numbers that were never committed (the gap
//!   between two batches), so the overlap answer errs only towards "may share records": such
//!   a batch is key-checked and lands in full, since none of its keys are in the table;
//! - when it last committed: a shard silent for longer than the horizon (closed by
//!   resharding, or idle past the stream's retention and the oldest replayable record) is
//!   dropped, so the ledger's size is bounded by the shards written within the horizon.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

pub use crate::model::sequence_cmp;
use crate::ports::InputRange;

/// The table property holding the ledger, as JSON.
pub const LEDGER_PROPERTY: &str = "adpipe.commit-ledger";

/// How much the ledger keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerLimits {
    /// Committed batch ids remembered per shard, newest last.
    pub recent_batches: usize,
    /// Sequence ranges kept per shard before the lowest two are merged.
    pub ranges_per_shard: usize,
    /// A shard with no commit for this long is forgotten (milliseconds).
    pub horizon_ms: i64,
}

impl Default for LedgerLimits {
    fn default() -> Self {
        LedgerLimits {
            recent_batches: 16,
            ranges_per_shard: 16,
            // The template's defaults: the streams' retention (24 h) plus the oldest record
            // Lambda delivers (1 h). The functions read theirs (`TablesConfig::ledger_horizon_ms`).
            horizon_ms: 25 * 3_600_000,
        }
    }
}

/// One shard's entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLedger {
    pub stream: String,
    pub shard: String,
    /// Disjoint `[first, last]` sequence ranges, lowest first.
    pub ranges: Vec<(String, String)>,
    /// The last committed batch ids, oldest first.
    pub recent: Vec<String>,
    /// When the shard last committed (epoch milliseconds).
    pub at_ms: i64,
}

/// The ledger of one table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitLedger {
    pub shards: Vec<ShardLedger>,
}

/// Whether two ranges of the same shard may share records.
pub fn overlaps(a: &InputRange, b: &InputRange) -> bool {
    if a.stream != b.stream || a.shard != b.shard {
        return false;
    }
    spans_overlap(
        (&a.first_sequence, &a.last_sequence),
        (&b.first_sequence, &b.last_sequence),
    )
}

fn spans_overlap(a: (&str, &str), b: (&str, &str)) -> bool {
    let le =
        |x: &str, y: &str| matches!(sequence_cmp(x, y), Some(Ordering::Less | Ordering::Equal));
    match (sequence_cmp(a.0, b.1), sequence_cmp(b.0, a.1)) {
        (Some(_), Some(_)) => le(a.0, b.1) && le(b.0, a.1),
        // Not comparable: only shared endpoints prove an overlap.
        _ => a.0 == b.0 || a.1 == b.1 || a.0 == b.1 || a.1 == b.0,
    }
}

fn numeric(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())
}

/// Orders ranges by their first sequence number; incomparable ones (never produced by Kinesis)
/// sort by their text, after all numeric ones.
fn range_order(a: &(String, String), b: &(String, String)) -> Ordering {
    match (numeric(&a.0), numeric(&b.0)) {
        (true, true) => sequence_cmp(&a.0, &b.0).unwrap_or(Ordering::Equal),
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => a.0.cmp(&b.0),
    }
}

fn max_seq(a: &str, b: &str) -> String {
    match sequence_cmp(a, b) {
        Some(Ordering::Less) => b.to_owned(),
        _ => a.to_owned(),
    }
}

fn min_seq(a: &str, b: &str) -> String {
    match sequence_cmp(a, b) {
        Some(Ordering::Greater) => b.to_owned(),
        _ => a.to_owned(),
    }
}

impl CommitLedger {
    /// Reads the ledger from its property value. A value that does not parse is an error:
    /// guessing would risk landing a batch twice.
    pub fn parse(json: &str) -> Result<CommitLedger, String> {
        serde_json::from_str(json)
            .map_err(|e| format!("the table's {LEDGER_PROPERTY} property: {e}"))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("the ledger serialises")
    }

    fn shard(&self, range: &InputRange) -> Option<&ShardLedger> {
        self.shards
            .iter()
            .find(|s| s.stream == range.stream && s.shard == range.shard)
    }

    /// Whether exactly this batch (by its id) is among the shard's recent commits.
    pub fn has_batch(&self, range: &InputRange, batch_id: &str) -> bool {
        self.shard(range)
            .is_some_and(|s| s.recent.iter().any(|id| id == batch_id))
    }

    /// Whether `range` may share records with a committed one.
    pub fn overlaps(&self, range: &InputRange) -> bool {
        self.shard(range).is_some_and(|s| {
            s.ranges.iter().any(|(first, last)| {
                spans_overlap((first, last), (&range.first_sequence, &range.last_sequence))
            })
        })
    }

    /// Records a committed batch at `now_ms`, then applies the limits.
    pub fn record(
        &mut self,
        range: &InputRange,
        batch_id: &str,
        now_ms: i64,
        limits: LedgerLimits,
    ) {
        let index = match self
            .shards
            .iter()
            .position(|s| s.stream == range.stream && s.shard == range.shard)
        {
            Some(i) => i,
            None => {
                self.shards.push(ShardLedger {
                    stream: range.stream.clone(),
                    shard: range.shard.clone(),
                    ranges: Vec::new(),
                    recent: Vec::new(),
                    at_ms: now_ms,
                });
                self.shards.len() - 1
            }
        };
        let shard = &mut self.shards[index];
        shard.at_ms = shard.at_ms.max(now_ms);
        shard.recent.retain(|id| id != batch_id);
        shard.recent.push(batch_id.to_owned());
        let excess = shard
            .recent
            .len()
            .saturating_sub(limits.recent_batches.max(1));
        shard.recent.drain(..excess);

        // Insert, merging every range the new one overlaps.
        let mut merged = (range.first_sequence.clone(), range.last_sequence.clone());
        shard.ranges.retain(|(first, last)| {
            if spans_overlap((first, last), (&merged.0, &merged.1)) {
                merged = (min_seq(first, &merged.0), max_seq(last, &merged.1));
                false
            } else {
                true
            }
        });
        shard.ranges.push(merged);
        shard.ranges.sort_by(range_order);
        while shard.ranges.len() > limits.ranges_per_shard.max(1) {
            let (_, last) = shard.ranges.remove(1);
            let first = &mut shard.ranges[0];
            first.1 = max_seq(&first.1, &last);
        }
        self.shards
            .retain(|s| now_ms.saturating_sub(s.at_ms) <= limits.horizon_ms);
        self.shards
            .sort_by(|a, b| (&a.stream, &a.shard).cmp(&(&b.stream, &b.shard)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range(shard: &str, first: u64, last: u64) -> InputRange {
        InputRange {
            stream: "joined".into(),
            shard: shard.into(),
            first_sequence: format!("4959{first:020}"),
            last_sequence: format!("4959{last:020}"),
        }
    }

    #[test]
    fn a_committed_batch_is_recognised_and_its_parts_overlap() {
        let mut ledger = CommitLedger::default();
        let r = range("s-0", 100, 200);
        ledger.record(&r, &r.batch_id(), 1_000, LedgerLimits::default());
        assert!(ledger.has_batch(&r, &r.batch_id()));
        assert!(ledger.overlaps(&range("s-0", 150, 160)));
        assert!(ledger.overlaps(&range("s-0", 200, 300)));
        assert!(!ledger.overlaps(&range("s-0", 201, 300)));
        assert!(!ledger.overlaps(&range("s-1", 100, 200)));
        let parsed = CommitLedger::parse(&ledger.to_json()).unwrap();
        assert_eq!(parsed, ledger);
        assert!(CommitLedger::parse("{").is_err());
    }

    #[test]
    fn an_idle_shard_is_forgotten_after_the_horizon() {
        let limits = LedgerLimits {
            horizon_ms: 10_000,
            ..LedgerLimits::default()
        };
        let mut ledger = CommitLedger::default();
        let old = range("s-0", 1, 2);
        ledger.record(&old, &old.batch_id(), 0, limits);
        let new = range("s-1", 1, 2);
        ledger.record(&new, &new.batch_id(), 10_000, limits);
        assert_eq!(ledger.shards.len(), 2);
        ledger.record(&new, &new.batch_id(), 10_001, limits);
        assert_eq!(ledger.shards.len(), 1);
        assert!(!ledger.overlaps(&old));
    }

    proptest! {
        /// Whatever the order and number of commits, the ledger stays within its limits,
        /// never loses a committed range (every committed batch still overlaps) and
        /// remembers the most recent batch ids exactly.
        #[test]
        fn the_ledger_is_bounded_and_never_forgets_a_range(
            batches in proptest::collection::vec((0u8..3, 0u64..10_000, 1u64..50), 1..300),
            ranges_per_shard in 1usize..8,
            recent in 1usize..8,
        ) {
            let limits = LedgerLimits { recent_batches: recent, ranges_per_shard, horizon_ms: i64::MAX };
            let mut ledger = CommitLedger::default();
            let mut committed = Vec::new();
            for (i, (shard, first, len)) in batches.iter().enumerate() {
                let r = range(&format!("s-{shard}"), *first, first + len);
                ledger.record(&r, &r.batch_id(), i as i64, limits);
                committed.push(r);
                for s in &ledger.shards {
                    prop_assert!(s.ranges.len() <= ranges_per_shard);
                    prop_assert!(s.recent.len() <= recent);
                    for w in s.ranges.windows(2) {
                        prop_assert_eq!(sequence_cmp(&w[0].1, &w[1].0), Some(Ordering::Less));
                    }
                }
            }
            for r in &committed {
                prop_assert!(ledger.overlaps(r));
            }
            let last = committed.last().unwrap();
            prop_assert!(ledger.has_batch(last, &last.batch_id()));
            // A range above everything committed on its shard never overlaps.
            let top = range("s-0", 20_000, 20_001);
            prop_assert!(!ledger.overlaps(&top));
        }
    }
}
