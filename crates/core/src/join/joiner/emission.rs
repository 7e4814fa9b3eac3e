//! Emission of a range's pending outputs after its batch is written: pairs one per record,
//! forwarded impressions packed per bucket; what is accepted leaves the pending set, and the
//! head is acknowledged once nothing is left.

use std::collections::BTreeMap;

use crate::join::buckets::{bucket_of, explicit_hash_key};
use crate::join::emit;
use crate::join::input::{flag_recovered, BatchReport};
use crate::join::state::Pending;
use crate::metrics::Counts;
use crate::model::{pack_impressions, ImpressionRecord, JoinedStreamRecord};
use crate::ports::{DeadLetterSink, OutRecord, RecordSink, ShardRanges, StateLog};

use super::{Held, KeyedJoiner};

/// The records to put, and for each the pending outputs it carries.
type Outputs = (Vec<OutRecord>, Vec<Vec<Pending>>);

impl<L: StateLog, R: ShardRanges, K: RecordSink, D: DeadLetterSink> KeyedJoiner<L, R, K, D> {
    /// Emits every pending output. If some were not accepted, the batch reports its last
    /// record failed: every record is in the log, and the redelivery of the last re-emits.
    pub(super) async fn emit_pending(&self, held: &mut Held, len: usize, report: &mut BatchReport) {
        let pending: Vec<Pending> = held.memory.pending().cloned().collect();
        if pending.is_empty() {
            return;
        }
        let head = held.memory.head;
        let (out, sendable) = outputs(held, pending);
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

/// The records of the pending outputs. Pairs travel one per record; forwarded impressions in
/// packs, one bucket per pack, so every copy of an impression lands on its bucket's shard.
fn outputs(held: &mut Held, pending: Vec<Pending>) -> Outputs {
    let mut sendable: Vec<Vec<Pending>> = Vec::new();
    let mut out = Vec::new();
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
            None => {
                // Its events left the state (past the horizon): nothing can rebuild it.
                tracing::error!(output = ?p, "pending output's events are past the horizon; dropped");
                held.memory.accepted(&p);
            }
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
    (out, sendable)
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
