//! One Kinesis batch through the joiner, generic over the ports: decode, store each side with
//! one atomic write, decide, emit joined records, mark them emitted, dead-letter what must be.
//!
//! Failure contract (see `docs/DESIGN.md`): a record that could not be finished makes the batch
//! report its index as the first failure; Lambda then redelivers it and every later record of
//! the shard. Everything this batch did for later records is idempotent under that redelivery.

use std::collections::BTreeMap;

use futures::stream::{self, StreamExt};

use crate::config::JoinerConfig;
use crate::dead_letter;
use crate::emit::{self};
use crate::join::{
    decide_click, decide_impression, Arrival, Arriving, Decision, StoredClick, StoredImpression,
    MAX_CLICKS_PER_IMPRESSION,
};
use crate::metrics::Counts;
use crate::model::{Event, InputRecord, JoinedStreamRecord, RecordKind};
use crate::ports::{
    DeadLetter, DeadLetterSink, JoinState, OutRecord, PortError, RecordSink, SideWrite,
};
use crate::validate::{decode, RejectReason, Rejection};

/// The function name used in dead-letter keys and metrics.
pub const FUNCTION: &str = "joiner";

/// The joiner's batch processor.
pub struct BatchJoiner<S, K, D> {
    pub state: S,
    pub sink: K,
    pub dead_letters: D,
    pub config: JoinerConfig,
}

/// What a batch came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Index of the first record that must be redelivered, if any.
    pub first_failure: Option<usize>,
    /// Every unfinished record with the reason, by index.
    pub failures: BTreeMap<usize, String>,
    pub counts: Counts,
}

/// A joined-stream record and, for a pair, the key of the mark to write once it is accepted.
struct Output {
    record: OutRecord,
    mark: Option<(String, String)>,
}

/// Something to write after the decisions, owned by the earliest record that needs it.
struct Owned<T> {
    owner: usize,
    item: T,
}

fn keep_earliest<T>(map: &mut BTreeMap<String, Owned<T>>, key: String, owner: usize, item: T) {
    map.entry(key)
        .and_modify(|o| o.owner = o.owner.min(owner))
        .or_insert(Owned { owner, item });
}

impl<S: JoinState, K: RecordSink, D: DeadLetterSink> BatchJoiner<S, K, D> {
    pub fn new(state: S, sink: K, dead_letters: D, config: JoinerConfig) -> Self {
        BatchJoiner {
            state,
            sink,
            dead_letters,
            config,
        }
    }

    fn parse(&self, record: &InputRecord) -> Result<Event, Rejection> {
        parse_input(&self.config, record)
    }

    fn ttl_epoch_s(&self, now_ms: i64) -> i64 {
        (now_ms + self.config.rules.retention_ms + self.config.ttl_grace_ms) / 1000
    }

    async fn write_and_decide(
        &self,
        event: &Event,
        source: &str,
        now_ms: i64,
    ) -> Result<Decision, PortError> {
        let ttl = self.ttl_epoch_s(now_ms);
        let rules = &self.config.rules;
        let at = Arriving { source, now_ms };
        match event {
            Event::Impression(imp) => {
                let side = StoredImpression {
                    impression: imp.clone(),
                    arrived_at_ms: now_ms,
                    source: source.to_owned(),
                };
                let before = self
                    .state
                    .put_if_absent(SideWrite::Impression(&side), ttl)
                    .await?;
                Ok(decide_impression(rules, &before, imp, at))
            }
            Event::Click(click) => {
                let side = StoredClick {
                    click: click.clone(),
                    arrived_at_ms: now_ms,
                    source: source.to_owned(),
                    emitted: false,
                };
                let before = self
                    .state
                    .put_if_absent(SideWrite::Click(&side), ttl)
                    .await?;
                Ok(decide_click(rules, &before, click, at))
            }
        }
    }

    /// Processes one batch of records from one shard, in sequence order.
    pub async fn process(&self, records: &[InputRecord], now_ms: i64) -> BatchReport {
        let cfg = &self.config;
        let parallel = cfg.max_in_flight.max(1);
        let mut counts = Counts {
            records_in: records.len() as u64,
            ..Counts::default()
        };
        let parsed: Vec<Result<Event, Rejection>> = records.iter().map(|r| self.parse(r)).collect();
        for p in &parsed {
            match p {
                Ok(Event::Impression(_)) => counts.impressions += 1,
                Ok(Event::Click(_)) => counts.clicks += 1,
                Err(rejection) => counts.reject(rejection.reason),
            }
        }

        // 1. Store every valid side (one atomic write each) and dead-letter the invalid ones.
        let steps: Vec<(usize, Result<Option<Decision>, PortError>)> =
            stream::iter(parsed.iter().enumerate())
                .map(|(i, p)| async move {
                    let step = match p {
                        Ok(event) => {
                            let source = records[i].position.key();
                            self.write_and_decide(event, &source, now_ms)
                                .await
                                .map(Some)
                        }
                        Err(rejection) => {
                            let letter = dead_letter::rejected(
                                &cfg.dead_letter_prefix,
                                FUNCTION,
                                &records[i].position,
                                &records[i].data,
                                rejection,
                                now_ms,
                            );
                            self.dead_letters.put(&letter).await.map(|()| None)
                        }
                    };
                    (i, step)
                })
                .buffer_unordered(parallel)
                .collect()
                .await;

        // 2. Gather what the decisions ask for. A record at or after the first failure is
        //    redelivered by Lambda and re-derives its outputs then (as its own retry), so its
        //    outputs are held back now: sending them twice could only add duplicates.
        let mut failures: BTreeMap<usize, String> = BTreeMap::new();
        let mut decisions: Vec<(usize, Decision)> = Vec::new();
        for (i, step) in steps {
            match step {
                Err(e) => {
                    failures.insert(i, e.to_string());
                }
                Ok(None) => {}
                Ok(Some(d)) => decisions.push((i, d)),
            }
        }
        let cut = failures.keys().next().copied().unwrap_or(records.len());
        let mut outputs: BTreeMap<String, Owned<Output>> = BTreeMap::new();
        let mut letters: BTreeMap<String, Owned<DeadLetter>> = BTreeMap::new();
        for (i, decision) in decisions {
            match decision.arrival {
                Arrival::New => {
                    counts.buffered += u64::from(decision.buffered);
                    counts.late += decision.late.len() as u64;
                }
                Arrival::Duplicate => counts.duplicates += 1,
                Arrival::Conflicting => counts.reject(RejectReason::ConflictingDuplicate),
                Arrival::TooManyClicks => counts.reject(RejectReason::TooManyClicks),
            }
            counts.unmatched += u64::from(decision.unmatched);
            counts.deferred += u64::from(decision.deferred);
            if i >= cut {
                continue;
            }
            let refusal = match decision.arrival {
                Arrival::Conflicting => Some(Rejection::new(
                    RejectReason::ConflictingDuplicate,
                    "an event with this id and different content is already stored; nothing was overwritten",
                )),
                Arrival::TooManyClicks => Some(Rejection::new(
                    RejectReason::TooManyClicks,
                    format!(
                        "this impression id already holds {MAX_CLICKS_PER_IMPRESSION} clicks; nothing was written"
                    ),
                )),
                Arrival::New | Arrival::Duplicate => None,
            };
            if let Some(rejection) = refusal {
                let letter = dead_letter::rejected(
                    &cfg.dead_letter_prefix,
                    FUNCTION,
                    &records[i].position,
                    &records[i].data,
                    &rejection,
                    now_ms,
                );
                keep_earliest(&mut letters, letter.key.clone(), i, letter);
            }
            let stream_records = decision
                .pairs
                .into_iter()
                .map(JoinedStreamRecord::Click)
                .chain(decision.forward.map(JoinedStreamRecord::Impression));
            for record in stream_records {
                let (imp, click) = record.key();
                let key = format!("{imp}\u{0}{click}");
                let mark = match &record {
                    JoinedStreamRecord::Click(c) => {
                        Some((c.impression_id.clone(), c.click_id.clone()))
                    }
                    JoinedStreamRecord::Impression(_) => None,
                };
                match serde_json::to_vec(&record) {
                    Ok(data) => {
                        let out = OutRecord {
                            partition_key: record.partition_key().to_owned(),
                            data,
                            explicit_hash_key: None,
                        };
                        keep_earliest(&mut outputs, key, i, Output { record: out, mark });
                    }
                    Err(e) => {
                        failures
                            .entry(i)
                            .or_insert_with(|| format!("cannot encode joined record: {e}"));
                    }
                }
            }
            for late in decision.late {
                let letter = dead_letter::late(
                    &cfg.late_prefix,
                    FUNCTION,
                    &late,
                    cfg.rules.retention_ms,
                    now_ms,
                );
                keep_earliest(&mut letters, letter.key.clone(), i, letter);
            }
        }

        // 3. Emit the outputs and write the letters.
        let output_list: Vec<Owned<Output>> = outputs.into_values().collect();
        let out: Vec<OutRecord> = output_list.iter().map(|o| o.item.record.clone()).collect();
        let letter_list: Vec<Owned<DeadLetter>> = letters.into_values().collect();
        let (emitted, letter_results) = futures::join!(
            emit::send_all(&self.sink, &out, &cfg.emit_retry, flag_recovered),
            stream::iter(letter_list.iter())
                .map(|o| async move { (o.owner, self.dead_letters.put(&o.item).await) })
                .buffer_unordered(parallel)
                .collect::<Vec<_>>()
        );
        for (owner, result) in letter_results {
            if let Err(e) = result {
                failures.entry(owner).or_insert_with(|| e.to_string());
            }
        }
        counts.emit_retries = u64::from(emitted.retried_entries);
        let mut accepted = Vec::new();
        for (owned, error) in output_list.iter().zip(emitted.errors) {
            match error {
                Some(e) => {
                    failures
                        .entry(owned.owner)
                        .or_insert_with(|| format!("joined record not accepted: {e}"));
                }
                None => match &owned.item.mark {
                    Some(pair) => accepted.push(pair),
                    None => counts.forwarded += 1,
                },
            }
        }
        counts.joined = accepted.len() as u64;

        // 4. Mark the pairs the output stream accepted. A failed mark is not a failed record: it
        //    can only cause a re-emission if the record is redelivered anyway (see DESIGN.md).
        let ttl = self.ttl_epoch_s(now_ms);
        let marks: Vec<Result<(), PortError>> = stream::iter(accepted)
            .map(|(imp, click)| self.state.mark_emitted(imp, click, ttl))
            .buffer_unordered(parallel)
            .collect()
            .await;
        counts.mark_failures = marks.iter().filter(|m| m.is_err()).count() as u64;

        let first_failure = failures.keys().next().copied();
        counts.failed = first_failure.map_or(0, |f| (records.len() - f) as u64);
        if let Some(first) = first_failure {
            tracing::warn!(
                first_failure = first,
                failed_records = failures.len(),
                reason = %failures[&first],
                "batch could not be finished; reporting the first failed record for redelivery"
            );
        }
        BatchReport {
            first_failure,
            failures,
            counts,
        }
    }
}

/// Which input stream a record came from, by its stream's name.
fn kind_of(config: &JoinerConfig, stream: &str) -> Option<RecordKind> {
    if stream == config.impressions_stream {
        Some(RecordKind::Impression)
    } else if stream == config.clicks_stream {
        Some(RecordKind::Click)
    } else {
        None
    }
}

/// Validates one input record: its envelope, its source stream, its fields and its event time.
/// The router and the per-event joiner share it, so both refuse exactly the same records.
pub fn parse_input(config: &JoinerConfig, record: &InputRecord) -> Result<Event, Rejection> {
    if let Some(detail) = &record.invalid_base64 {
        return Err(Rejection::new(RejectReason::InvalidBase64, detail.clone()));
    }
    let kind = kind_of(config, &record.position.stream).ok_or_else(|| {
        Rejection::new(
            RejectReason::UnknownSource,
            format!(
                "stream {:?} is neither the impressions stream {:?} nor the clicks stream {:?}",
                record.position.stream, config.impressions_stream, config.clicks_stream
            ),
        )
    })?;
    let event = decode(kind, &record.data)?;
    let time_ms = match &event {
        Event::Impression(i) => i.event_time_ms,
        Event::Click(c) => c.event_time_ms,
    };
    config
        .time_bounds
        .check("event_time", time_ms, record.arrival_ms)?;
    Ok(event)
}

/// The same joined-stream record flagged `recovered`: it may already be on the stream (a
/// `PutRecords` that failed without an answer may have been written).
pub(crate) fn flag_recovered(record: &OutRecord) -> OutRecord {
    // Only records this crate encoded get here; keep the bytes if one ever does not decode.
    let data =
        crate::model::flag_recovered_bytes(&record.data).unwrap_or_else(|| record.data.clone());
    OutRecord {
        partition_key: record.partition_key.clone(),
        data,
        explicit_hash_key: record.explicit_hash_key.clone(),
    }
}
