//! The keyed stream: both input streams re-keyed by `impression_id` into one stream, so every
//! event of one impression id reaches one shard, in order, and one writer decides it.
//!
//! The router validates each input record (dead-lettering what is invalid, exactly as the
//! per-event joiner did), maps its `impression_id` to one of [`HASH_BUCKETS`] fixed buckets and
//! packs the events of one bucket into keyed records. Each keyed record carries an
//! `ExplicitHashKey` in the middle of its bucket's slice of Kinesis' 128-bit hash space, so a
//! whole bucket lives on exactly one shard whatever the shard count, and a shard owns a
//! contiguous [`BucketRange`]. The join state is keyed by that range, never by a shard id, so it
//! outlives resharding.

use std::collections::BTreeMap;

use futures::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};

use crate::config::JoinerConfig;
use crate::dead_letter;
use crate::join::buckets::{bucket_of, explicit_hash_key};
use crate::join::emit;
use crate::join::input::{parse_input, BatchReport, FUNCTION};
use crate::kpl;
use crate::metrics::Counts;
use crate::model::{Click, Event, Impression, InputRecord, SourcePosition};
use crate::ports::{DeadLetterSink, OutRecord, RecordSink};
use crate::validate::{RejectReason, Rejection};

/// Largest keyed record the router writes (data bytes). Far below Kinesis' 1 MiB record limit
/// and a 6 MB Lambda payload; a bucket's events beyond it go into further records.
pub const MAX_KEYED_RECORD_BYTES: usize = 64 * 1024;

/// The keyed record format's version.
pub const KEYED_FORMAT: u32 = 1;

/// The explicit hash key a record must be put back with (a redrive, a replay), read from its
/// content: a keyed record goes to its bucket's shard, and so does a joined-stream pack of
/// forwarded impressions (every copy of an impression on one shard, in order). `None` for
/// anything else, which the partition key alone placed when it was first put.
pub fn home_hash_key(data: &[u8]) -> Option<String> {
    let id = if let Ok(events) = unpack(data) {
        let first = events.into_iter().next()?;
        match (first.impression, first.click) {
            (Some(i), _) => i.impression_id,
            (None, Some(c)) => c.impression_id,
            (None, None) => return None,
        }
    } else {
        match serde_json::from_slice::<crate::model::JoinedWire>(data).ok()? {
            crate::model::JoinedWire::Impressions(p) => {
                p.impressions.into_iter().next()?.impression_id
            }
            _ => return None,
        }
    };
    Some(explicit_hash_key(bucket_of(&id)))
}

/// One validated input event on the keyed stream, with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyedEvent {
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub impression: Option<Impression>,
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub click: Option<Click>,
    /// The input record's position (for dead letters and orphan records).
    #[serde(rename = "s")]
    pub source: SourcePosition,
    /// The input record's arrival on its stream, epoch ms.
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub arrival_ms: Option<i64>,
}

impl KeyedEvent {
    pub fn new(event: Event, source: SourcePosition, arrival_ms: Option<i64>) -> Self {
        let (impression, click) = match event {
            Event::Impression(i) => (Some(i), None),
            Event::Click(c) => (None, Some(c)),
        };
        KeyedEvent {
            impression,
            click,
            source,
            arrival_ms,
        }
    }

    /// The event, if the record holds exactly one side.
    pub fn event(&self) -> Option<Event> {
        match (&self.impression, &self.click) {
            (Some(i), None) => Some(Event::Impression(i.clone())),
            (None, Some(c)) => Some(Event::Click(c.clone())),
            _ => None,
        }
    }
}

/// One record of the keyed stream: events of one bucket, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KeyedRecord {
    v: u32,
    b: u32,
    e: Vec<KeyedEvent>,
}

/// Packs the events of each bucket into keyed records of at most [`MAX_KEYED_RECORD_BYTES`]
/// (one event is always a record of its own, whatever its size). Returns each record with the
/// indexes of the input records it carries.
pub fn pack(events: Vec<(usize, KeyedEvent)>) -> Vec<(OutRecord, Vec<usize>)> {
    let mut by_bucket: BTreeMap<u32, Vec<(usize, KeyedEvent, Vec<u8>)>> = BTreeMap::new();
    for (index, event) in events {
        let bucket = match (&event.impression, &event.click) {
            (Some(i), _) => bucket_of(&i.impression_id),
            (None, Some(c)) => bucket_of(&c.impression_id),
            (None, None) => continue,
        };
        let bytes = serde_json::to_vec(&event).expect("a keyed event always encodes");
        by_bucket
            .entry(bucket)
            .or_default()
            .push((index, event, bytes));
    }
    let mut out = Vec::new();
    for (bucket, events) in by_bucket {
        let mut chunk: Vec<KeyedEvent> = Vec::new();
        let mut indexes = Vec::new();
        let mut size = 0;
        let flush = |chunk: &mut Vec<KeyedEvent>,
                     indexes: &mut Vec<usize>,
                     out: &mut Vec<(OutRecord, Vec<usize>)>| {
            if chunk.is_empty() {
                return;
            }
            let record = KeyedRecord {
                v: KEYED_FORMAT,
                b: bucket,
                e: std::mem::take(chunk),
            };
            out.push((
                OutRecord {
                    partition_key: format!("b{bucket}"),
                    data: serde_json::to_vec(&record).expect("a keyed record always encodes"),
                    explicit_hash_key: Some(explicit_hash_key(bucket)),
                },
                std::mem::take(indexes),
            ));
        };
        for (index, event, bytes) in events {
            if size + bytes.len() + 1 > MAX_KEYED_RECORD_BYTES {
                flush(&mut chunk, &mut indexes, &mut out);
                size = 0;
            }
            size += bytes.len() + 1;
            chunk.push(event);
            indexes.push(index);
        }
        flush(&mut chunk, &mut indexes, &mut out);
    }
    out
}

/// Decodes a keyed record into its events.
pub fn unpack(data: &[u8]) -> Result<Vec<KeyedEvent>, Rejection> {
    let record: KeyedRecord = serde_json::from_slice(data).map_err(|e| {
        Rejection::new(
            RejectReason::InvalidKeyedRecord,
            format!("not a keyed record: {e}"),
        )
    })?;
    if record.v != KEYED_FORMAT {
        return Err(Rejection::new(
            RejectReason::InvalidKeyedRecord,
            format!("keyed record format {} is not {KEYED_FORMAT}", record.v),
        ));
    }
    if let Some(bad) = record.e.iter().find(|e| e.event().is_none()) {
        return Err(Rejection::new(
            RejectReason::InvalidKeyedRecord,
            format!(
                "an event from {:?} holds neither exactly one impression nor one click",
                bad.source
            ),
        ));
    }
    Ok(record.e)
}

/// The router: input records in, keyed records out. Stateless; it touches no join state.
pub struct BatchRouter<K, D> {
    /// The keyed stream.
    pub sink: K,
    pub dead_letters: D,
    pub config: JoinerConfig,
}

impl<K: RecordSink, D: DeadLetterSink> BatchRouter<K, D> {
    pub fn new(sink: K, dead_letters: D, config: JoinerConfig) -> Self {
        BatchRouter {
            sink,
            dead_letters,
            config,
        }
    }

    /// Routes one batch of one input shard. A record is finished when it is dead-lettered or
    /// its keyed records were accepted; the first unfinished one is reported for redelivery.
    /// A redelivery may put an event on the keyed stream twice: the joiner recognises it.
    ///
    /// KPL aggregates are unpacked into their user records, each routed or dead-lettered on its
    /// own; an aggregate is finished when all of its user records are. A batch is unpacked in
    /// runs of at most [`kpl::MAX_USER_RECORDS_IN_MEMORY`] user records, so what it holds in
    /// memory is bounded whatever its aggregates carry.
    pub async fn process(&self, records: &[InputRecord], now_ms: i64) -> BatchReport {
        let mut report = BatchReport::new(records.len());
        for run in kpl::runs(records) {
            let start = run.start;
            let part = self.route(&records[run], start, now_ms).await;
            report.counts += &part.counts;
            report.failures.extend(part.failures);
            if !report.failures.is_empty() {
                // What follows the first failure is redelivered anyway.
                break;
            }
        }
        report.counts.records_in = records.len() as u64;
        report.first_failure = report.failures.keys().next().copied();
        report.counts.failed = report
            .first_failure
            .map_or(0, |f| (records.len() - f) as u64);
        report
    }

    /// Routes consecutive records, the first at index `offset` of the batch; failures are
    /// keyed by the batch's indexes.
    async fn route(&self, records: &[InputRecord], offset: usize, now_ms: i64) -> BatchReport {
        let cfg = &self.config;
        let mut counts = Counts::default();
        let mut failures: BTreeMap<usize, String> = BTreeMap::new();
        let mut letters = Vec::new();
        let mut events = Vec::new();
        let units: Vec<kpl::UserRecord<'_>> = records
            .iter()
            .enumerate()
            .flat_map(|(i, r)| kpl::user_records(offset + i, r))
            .collect();
        for unit in &units {
            let record = unit.record.as_ref();
            if record.position.sub_sequence_number.is_some() {
                counts.user_records += 1;
            }
            let parsed = match &unit.refused {
                Some(rejection) => Err(rejection.clone()),
                None => parse_input(cfg, record),
            };
            match parsed {
                Ok(event) => {
                    match &event {
                        Event::Impression(_) => counts.impressions += 1,
                        Event::Click(_) => counts.clicks += 1,
                    }
                    events.push((
                        unit.index,
                        KeyedEvent::new(event, record.position.clone(), record.arrival_ms),
                    ));
                }
                Err(rejection) => {
                    counts.reject(rejection.reason);
                    letters.push((
                        unit.index,
                        dead_letter::rejected(
                            &cfg.dead_letter_prefix,
                            FUNCTION,
                            &record.position,
                            &record.data,
                            &rejection,
                            now_ms,
                        ),
                    ));
                }
            }
        }
        drop(units);
        let packed = pack(events);
        let out: Vec<OutRecord> = packed.iter().map(|(r, _)| r.clone()).collect();
        // A keyed record that may have been written is sent again as it is: the joiner
        // recognises the repeated events from its state, so no flag is needed here.
        let (emitted, letter_results) = futures::join!(
            emit::send_all(&self.sink, &out, &cfg.emit_retry, Clone::clone),
            stream::iter(letters.iter())
                .map(|(i, letter)| async move { (*i, self.dead_letters.put(letter).await) })
                .buffer_unordered(cfg.max_in_flight.max(1))
                .collect::<Vec<_>>()
        );
        counts.emit_retries = u64::from(emitted.retried_entries);
        for ((_, indexes), error) in packed.iter().zip(&emitted.errors) {
            if let Some(e) = error {
                for &i in indexes {
                    failures
                        .entry(i)
                        .or_insert_with(|| format!("keyed record not accepted: {e}"));
                }
            }
        }
        for (i, result) in letter_results {
            if let Err(e) = result {
                failures.entry(i).or_insert_with(|| e.to_string());
            }
        }
        BatchReport {
            first_failure: None,
            failures,
            counts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn packing_keeps_every_event_once_in_its_bucket_and_within_the_record_limit(
            ids in proptest::collection::vec("[a-z0-9]{1,40}", 1..200),
            pad in 0usize..300,
        ) {
            let events: Vec<(usize, KeyedEvent)> = ids.iter().enumerate().map(|(i, id)| {
                let imp = Impression {
                    ad_id: "a".repeat(pad.max(1)), impression_id: id.clone(),
                    campaign_id: "c".into(), publisher_id: "p".into(), event_time_ms: i as i64,
                    device_type: "mobile".into(), geo_location: "US".into(), platform: "ios".into(),
                    ad_type: "banner".into(), bid_price: 1.0,
                };
                let pos = SourcePosition { stream: "s".into(), shard: "shardId-0".into(), sequence_number: i.to_string(), sub_sequence_number: None };
                (i, KeyedEvent::new(Event::Impression(imp), pos, Some(i as i64)))
            }).collect();
            let packed = pack(events.clone());
            let mut seen = Vec::new();
            for (record, indexes) in &packed {
                prop_assert!(record.data.len() <= MAX_KEYED_RECORD_BYTES);
                let decoded = unpack(&record.data).unwrap();
                prop_assert_eq!(decoded.len(), indexes.len());
                let bucket: u32 = record.partition_key[1..].parse().unwrap();
                prop_assert_eq!(record.explicit_hash_key.clone(), Some(explicit_hash_key(bucket)));
                // Put back by a redrive, it goes to the same shard.
                prop_assert_eq!(home_hash_key(&record.data), Some(explicit_hash_key(bucket)));
                for (e, &i) in decoded.iter().zip(indexes) {
                    prop_assert_eq!(e, &events[i].1);
                    prop_assert_eq!(bucket_of(&e.impression.as_ref().unwrap().impression_id), bucket);
                    seen.push(i);
                }
                // Input order is kept within a bucket.
                prop_assert!(indexes.windows(2).all(|w| w[0] < w[1]));
            }
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..ids.len()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn only_keyed_records_and_joined_packs_are_put_back_by_hash_key() {
        let imp = crate::model::Impression {
            ad_id: "a".into(),
            impression_id: "b5".into(),
            campaign_id: "c".into(),
            publisher_id: "p".into(),
            event_time_ms: 0,
            device_type: "mobile".into(),
            geo_location: "US".into(),
            platform: "ios".into(),
            ad_type: "banner".into(),
            bid_price: 1.0,
        };
        let record = crate::model::ImpressionRecord::new(&imp, false);
        let (pack, _) = crate::model::pack_impressions(std::slice::from_ref(&record))
            .pop()
            .unwrap();
        assert_eq!(
            home_hash_key(&pack),
            Some(explicit_hash_key(bucket_of("b5")))
        );
        // A single record (a pair, an input event) keeps its partition key's placement, even
        // with an id that looks like a bucket's key.
        let single =
            serde_json::to_vec(&crate::model::JoinedStreamRecord::Impression(record)).unwrap();
        assert_eq!(home_hash_key(&single), None);
        assert_eq!(home_hash_key(&serde_json::to_vec(&imp).unwrap()), None);
        assert_eq!(home_hash_key(b"not json"), None);
    }

    #[test]
    fn a_record_that_is_not_a_keyed_record_is_refused_with_its_reason() {
        for data in [&b"{}"[..], b"not json", br#"{"v":2,"b":0,"e":[]}"#] {
            let err = unpack(data).unwrap_err();
            assert_eq!(err.reason, RejectReason::InvalidKeyedRecord, "{data:?}");
        }
        let both = br#"{"v":1,"b":0,"e":[{"s":{"stream":"x","shard":"y","sequence_number":"1"}}]}"#;
        assert_eq!(
            unpack(both).unwrap_err().reason,
            RejectReason::InvalidKeyedRecord
        );
    }
}
