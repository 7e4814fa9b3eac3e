//! Emission of a range's pending outputs after its batch is written: pairs one per record,
//! forwarded impressions packed per bucket; what is accepted leaves the pending set, and the
//! head is acknowledged once nothing is left.

use std::collections::BTreeMap;

use crate::dead_letter;
use crate::join::buckets::{bucket_of, explicit_hash_key};
use crate::join::emit;
use crate::join::input::{flag_recovered, BatchReport, FUNCTION};
use crate::join::state::Pending;
use crate::metrics::Counts;
use crate::model::{pack_impressions, ImpressionRecord, JoinedStreamRecord};
use crate::ports::{DeadLetter, DeadLetterSink, OutRecord, RecordSink, ShardRanges, StateLog};

use super::{put_all, Held, KeyedJoiner};

/// The records to put, for each the pending outputs it carries, and the pending outputs that
/// cannot be built any more (their events passed the horizon).
type Outputs = (Vec<OutRecord>, Vec<Vec<Pending>>, Vec<Pending>);

impl<L: StateLog, R: ShardRanges, K: RecordSink, D: DeadLetterSink> KeyedJoiner<L, R, K, D> {
    /// Emits every pending output. If some were not accepted, the batch reports its last
    /// record failed: every record is in the log, and the redelivery of the last re-emits.
    pub(super) async fn emit_pending(&self, held: &mut Held, len: usize, report: &mut BatchReport) {
        let pending: Vec<Pending> = held.memory.pending().cloned().collect();
        if pending.is_empty() {
            return;
        }
        let head = held.memory.head;
        let (out, sendable, lost) = outputs(held, pending);
        self.record_lost(held, lost, report).await;
        let emitted =
            emit::send_all(&self.sink, &out, &self.config.emit_retry, flag_recovered).await;
        report.counts.emit_retries = u64::from(emitted.retried_entries);
        let unsent = settle(held, sendable, emitted.errors, &mut report.counts);
        match unsent {
            None => {
                // Every output up to the head is on the stream: a writer that catches up
                // later need not send them again. Losing this write only costs flagged
                // repeats.
                if let Some(n) = head {
                    if let Err(e) = self.log.ack(&held.memory.log, n).await {
                        tracing::warn!(error = %e, "acknowledgement not written");
                    }
                }
            }
            Some(e) => {
                let last = len - 1;
                report.first_failure = Some(last);
                report
                    .failures
                    .insert(last, format!("joined records pending, not accepted: {e}"));
                report.counts.failed = 1;
            }
        }
    }
}

impl<L: StateLog, R: ShardRanges, K: RecordSink, D: DeadLetterSink> KeyedJoiner<L, R, K, D> {
    /// Records the outputs whose events passed the horizon before the joined stream took them
    /// (`dead-letter/lost-output/`, counted as `OutputsLost`), then lets them go. If the
    /// entries cannot be written they stay pending, and the next batch tries again.
    async fn record_lost(&self, held: &mut Held, lost: Vec<Pending>, report: &mut BatchReport) {
        if lost.is_empty() {
            return;
        }
        let now_ms = held.memory.now_ms();
        let letters: Vec<DeadLetter> = lost
            .iter()
            .map(|p| {
                let (impression_id, click_id) = match p {
                    Pending::Pair(i, c) => (i.as_str(), Some(c.as_str())),
                    Pending::Forward(i) => (i.as_str(), None),
                };
                dead_letter::lost_output(
                    &self.config.dead_letter_prefix,
                    FUNCTION,
                    impression_id,
                    click_id,
                    now_ms,
                )
            })
            .collect();
        let written = put_all(&letters, self.config.max_in_flight, |l| {
            self.dead_letters.put(l)
        })
        .await;
        match written {
            Ok(()) => {
                tracing::error!(
                    outputs = lost.len(),
                    "pending outputs passed the horizon unsent; recorded as lost"
                );
                report.counts.outputs_lost += lost.len() as u64;
                for p in &lost {
                    held.memory.accepted(p);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "lost outputs not recorded; retried with the next batch")
            }
        }
    }
}

/// The records of the pending outputs. Pairs travel one per record; forwarded impressions in
/// packs, one bucket per pack, so every copy of an impression lands on its bucket's shard.
fn outputs(held: &mut Held, pending: Vec<Pending>) -> Outputs {
    let mut sendable: Vec<Vec<Pending>> = Vec::new();
    let mut out = Vec::new();
    let mut lost = Vec::new();
    let mut forwards: BTreeMap<u32, Vec<(Pending, ImpressionRecord)>> = BTreeMap::new();
    for p in pending {
        let recovered = held.maybe_sent.contains(&p);
        match held.memory.materialize(&p, recovered) {
            Some(JoinedStreamRecord::Impression(record)) => forwards
                .entry(bucket_of(&record.impression_id))
                .or_default()
                .push((p, record)),
            Some(record) => {
                out.push(OutRecord {
                    partition_key: record.partition_key().to_owned(),
                    data: serde_json::to_vec(&record).expect("a joined record always encodes"),
                    explicit_hash_key: None,
                });
                sendable.push(vec![p]);
            }
            // Its events left the state (past the horizon): nothing can rebuild it.
            None => lost.push(p),
        }
    }
    for (bucket, items) in forwards {
        let (ps, records): (Vec<Pending>, Vec<ImpressionRecord>) = items.into_iter().unzip();
        let mut ps = ps.into_iter();
        for (data, count) in pack_impressions(&records) {
            out.push(OutRecord {
                partition_key: format!("b{bucket}"),
                data,
                explicit_hash_key: Some(explicit_hash_key(bucket)),
            });
            sendable.push(ps.by_ref().take(count).collect());
        }
    }
    (out, sendable, lost)
}

/// Takes the accepted outputs out of the pending set and counts them; the others may be on
/// the stream already (flagged `recovered` when sent again). The first error, if any.
fn settle(
    held: &mut Held,
    sendable: Vec<Vec<Pending>>,
    errors: Vec<Option<String>>,
    counts: &mut Counts,
) -> Option<String> {
    let mut unsent = None;
    for (ps, error) in sendable.into_iter().zip(errors) {
        for p in ps {
            match &error {
                None => {
                    match p {
                        Pending::Pair(..) => counts.joined += 1,
                        Pending::Forward(_) => counts.forwarded += 1,
                    }
                    held.memory.accepted(&p);
                    held.maybe_sent.remove(&p);
                }
                Some(e) => {
                    held.maybe_sent.insert(p);
                    unsent.get_or_insert(e.clone());
                }
            }
        }
    }
    unsent
}
