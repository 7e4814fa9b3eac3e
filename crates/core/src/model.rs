//! The domain records: impressions, clicks, joined pairs, and where each input came from.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::time::format_millis;

/// Version of the joined stream's JSON schema (see `docs/SCHEMAS.md`).
pub const JOINED_SCHEMA_VERSION: u32 = 1;

/// Which input stream a record came from. Decided by configuration (the source stream's
/// name), never by guessing from the record's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Impression,
    Click,
}

/// Where an input record sits in Kinesis. Sequence numbers are opaque strings: real ones have
/// up to 129 digits, local endpoints use short ones, so they are never parsed as numbers. A
/// user record of a KPL aggregate also has its sub-sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    pub stream: String,
    pub shard: String,
    pub sequence_number: String,
    /// The user record's index in a KPL aggregate (`None` for a plain record): the records of
    /// one aggregate share its sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_sequence_number: Option<u64>,
}

/// Orders Kinesis sequence numbers: decimal digit strings compare as numbers. Anything else is
/// only ever equal to itself (`None`).
pub fn sequence_cmp(a: &str, b: &str) -> Option<Ordering> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if a == b {
        return Some(Ordering::Equal);
    }
    if !(digits(a) && digits(b)) {
        return None;
    }
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    Some(a.len().cmp(&b.len()).then_with(|| a.cmp(b)))
}

/// One raw record of a Kinesis batch, as the event source mapping delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRecord {
    pub position: SourcePosition,
    /// The record's bytes; if the envelope's base64 could not be decoded, the base64 text
    /// itself (kept for the dead letter).
    pub data: Vec<u8>,
    /// Why the envelope's `data` is not valid base64, if it is not. Lambda always sends valid
    /// base64; a record that is not is dead-lettered as `invalid_base64`, not a failed batch.
    pub invalid_base64: Option<String>,
    /// When the record arrived on its stream (Kinesis' `approximateArrivalTimestamp`), epoch ms;
    /// `None` if the event did not say. The bound on event times ahead of arrival uses it.
    pub arrival_ms: Option<i64>,
}

/// A validated ad impression. Event time is held in UTC epoch milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Impression {
    pub ad_id: String,
    pub impression_id: String,
    pub campaign_id: String,
    pub publisher_id: String,
    pub event_time_ms: i64,
    pub device_type: String,
    pub geo_location: String,
    pub platform: String,
    pub ad_type: String,
    pub bid_price: f64,
}

/// A validated click. `click_id` is the producer's, or derived from the content when absent
/// (`click_id_derived`), so that a redelivered click keeps its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Click {
    pub ad_id: String,
    pub impression_id: String,
    pub campaign_id: String,
    pub publisher_id: String,
    pub event_time_ms: i64,
    pub device_type: String,
    pub geo_location: String,
    pub platform: String,
    pub click_price: f64,
    pub click_id: String,
    pub click_id_derived: bool,
}

/// A validated input event of either kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Impression(Impression),
    Click(Click),
}

impl Event {
    /// The key both sides share in the join state.
    pub fn impression_id(&self) -> &str {
        match self {
            Event::Impression(i) => &i.impression_id,
            Event::Click(c) => &c.impression_id,
        }
    }

    /// The event's own time, epoch ms.
    pub fn event_time_ms(&self) -> i64 {
        match self {
            Event::Impression(i) => i.event_time_ms,
            Event::Click(c) => c.event_time_ms,
        }
    }
}

/// A record of the joined stream: an attributed click, or a first-seen impression forwarded so
/// the lake has CTR denominators. Tagged by `type` (`click` / `impression`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JoinedStreamRecord {
    Click(JoinedRecord),
    Impression(ImpressionRecord),
}

impl JoinedStreamRecord {
    /// The partition key on the joined stream: every record of one impression lands on one
    /// shard, in order, so the enricher sees an original before any recovered copy of it.
    pub fn partition_key(&self) -> &str {
        match self {
            JoinedStreamRecord::Click(c) => &c.impression_id,
            JoinedStreamRecord::Impression(i) => &i.impression_id,
        }
    }

    /// The dedup key in the lake: `(impression_id, click_id)` for clicks, `impression_id` alone
    /// (empty `click_id`) for impressions.
    pub fn key(&self) -> (&str, &str) {
        match self {
            JoinedStreamRecord::Click(c) => (&c.impression_id, &c.click_id),
            JoinedStreamRecord::Impression(i) => (&i.impression_id, ""),
        }
    }

    /// Whether this record may repeat one already on the stream (see [`JoinedRecord::recovered`]).
    pub fn recovered(&self) -> bool {
        match self {
            JoinedStreamRecord::Click(c) => c.recovered,
            JoinedStreamRecord::Impression(i) => i.recovered,
        }
    }

    /// Flags the record as one that may repeat an earlier copy on the stream.
    pub fn set_recovered(&mut self) {
        match self {
            JoinedStreamRecord::Click(c) => c.recovered = true,
            JoinedStreamRecord::Impression(i) => i.recovered = true,
        }
    }
}

/// Forwarded impressions travel packed: one joined-stream record holds the impressions a batch
/// forwards in one bucket (at most [`MAX_PACK_BYTES`]), so the stream carries about one record
/// per 70 impressions instead of one each. A pack's impressions share a bucket and the pack is
/// put with that bucket's explicit hash key, so every copy of one impression (the original and
/// any recovered copy) lands on the same shard, in order, as a partition key would place it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImpressionPack {
    pub impressions: Vec<ImpressionRecord>,
}

/// The largest pack's data: one Kinesis PUT payload unit (25 KB) with room for the key.
pub const MAX_PACK_BYTES: usize = 24_000;

/// What one joined-stream record carries on the wire: a single record, or a pack of forwarded
/// impressions (`"type": "impressions"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JoinedWire {
    Click(JoinedRecord),
    Impression(ImpressionRecord),
    Impressions(ImpressionPack),
}

impl JoinedWire {
    /// The records it carries, in order.
    pub fn into_records(self) -> Vec<JoinedStreamRecord> {
        match self {
            JoinedWire::Click(c) => vec![JoinedStreamRecord::Click(c)],
            JoinedWire::Impression(i) => vec![JoinedStreamRecord::Impression(i)],
            JoinedWire::Impressions(p) => p
                .impressions
                .into_iter()
                .map(JoinedStreamRecord::Impression)
                .collect(),
        }
    }
}

/// Encodes forwarded impressions into packs of at most [`MAX_PACK_BYTES`], in order. Returns
/// each pack's bytes and how many impressions it holds (a record too large to share a pack
/// travels alone).
pub fn pack_impressions(records: &[ImpressionRecord]) -> Vec<(Vec<u8>, usize)> {
    const HEAD: &[u8] = br#"{"type":"impressions","impressions":["#;
    const TAIL: &[u8] = b"]}";
    let mut packs = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    let mut count = 0;
    for record in records {
        let bytes = serde_json::to_vec(record).expect("an impression record always encodes");
        if count > 0 && current.len() + 1 + bytes.len() + TAIL.len() > MAX_PACK_BYTES {
            current.extend_from_slice(TAIL);
            packs.push((std::mem::take(&mut current), count));
            count = 0;
        }
        current.extend_from_slice(if count == 0 { HEAD } else { b"," });
        current.extend_from_slice(&bytes);
        count += 1;
    }
    if count > 0 {
        current.extend_from_slice(TAIL);
        packs.push((current, count));
    }
    packs
}

/// A joined-stream record as it must be put back on the stream by a redrive or an operator's
/// replay: flagged `recovered`, so the enricher lands each of its rows only if the row's key is
/// not in the table yet.
///
/// A record put back gets new sequence numbers, so nothing else tells the enricher that it may
/// already have landed (in one table or in both: the two appends commit independently). The
/// record is edited as JSON, so a field this version does not know is kept. `None` for bytes
/// that are not a click, impression or pack record (they are put back as they are, and dead-lettered
/// again by the enricher).
pub fn flag_recovered_bytes(data: &[u8]) -> Option<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(data).ok()?;
    let object = value.as_object_mut()?;
    match object.get("type").and_then(serde_json::Value::as_str) {
        Some("click" | "impression") => {
            object.insert("recovered".to_owned(), serde_json::Value::Bool(true));
        }
        Some("impressions") => {
            for inner in object.get_mut("impressions")?.as_array_mut()? {
                inner
                    .as_object_mut()?
                    .insert("recovered".to_owned(), serde_json::Value::Bool(true));
            }
        }
        _ => return None,
    }
    serde_json::to_vec(&value).ok()
}

/// A first-seen impression on the joined stream (schema version [`JOINED_SCHEMA_VERSION`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImpressionRecord {
    pub schema_version: u32,
    /// See [`JoinedRecord::recovered`].
    #[serde(default)]
    pub recovered: bool,
    pub impression_id: String,
    pub ad_id: String,
    pub campaign_id: String,
    pub publisher_id: String,
    pub impression_time: String,
    pub device_type: String,
    pub geo_location: String,
    pub platform: String,
    pub ad_type: String,
    pub bid_price: f64,
}

impl ImpressionRecord {
    pub fn new(imp: &Impression, recovered: bool) -> Self {
        ImpressionRecord {
            schema_version: JOINED_SCHEMA_VERSION,
            recovered,
            impression_id: imp.impression_id.clone(),
            ad_id: imp.ad_id.clone(),
            campaign_id: imp.campaign_id.clone(),
            publisher_id: imp.publisher_id.clone(),
            impression_time: format_millis(imp.event_time_ms),
            device_type: imp.device_type.clone(),
            geo_location: imp.geo_location.clone(),
            platform: imp.platform.clone(),
            ad_type: imp.ad_type.clone(),
            bid_price: imp.bid_price,
        }
    }
}

/// One attributed click on the joined stream (schema version [`JOINED_SCHEMA_VERSION`]).
///
/// The pair key is `(impression_id, click_id)`. Shared fields hold the impression's values;
/// the click's own values of the fields both sides carry are kept under `click_*`, so no input
/// field is lost. Apart from `recovered`, the content is a pure function of the two stored
/// events, so a re-emitted pair carries the same data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinedRecord {
    pub schema_version: u32,
    /// Set when this record was emitted by a redelivery completing earlier work: the first
    /// attempt may have reached the stream too, so the lake checks for the key before landing
    /// it. Never set on a first emission.
    #[serde(default)]
    pub recovered: bool,
    pub impression_id: String,
    pub click_id: String,
    pub click_id_derived: bool,
    pub ad_id: String,
    pub campaign_id: String,
    pub publisher_id: String,
    pub impression_time: String,
    pub click_time: String,
    pub device_type: String,
    pub geo_location: String,
    pub platform: String,
    pub ad_type: String,
    pub bid_price: f64,
    pub click_price: f64,
    pub click_campaign_id: String,
    pub click_publisher_id: String,
    pub click_device_type: String,
    pub click_geo_location: String,
    pub click_platform: String,
}

impl JoinedRecord {
    pub fn new(imp: &Impression, click: &Click) -> Self {
        JoinedRecord {
            schema_version: JOINED_SCHEMA_VERSION,
            recovered: false,
            impression_id: imp.impression_id.clone(),
            click_id: click.click_id.clone(),
            click_id_derived: click.click_id_derived,
            ad_id: imp.ad_id.clone(),
            campaign_id: imp.campaign_id.clone(),
            publisher_id: imp.publisher_id.clone(),
            impression_time: format_millis(imp.event_time_ms),
            click_time: format_millis(click.event_time_ms),
            device_type: imp.device_type.clone(),
            geo_location: imp.geo_location.clone(),
            platform: imp.platform.clone(),
            ad_type: imp.ad_type.clone(),
            bid_price: imp.bid_price,
            click_price: click.click_price,
            click_campaign_id: click.campaign_id.clone(),
            click_publisher_id: click.publisher_id.clone(),
            click_device_type: click.device_type.clone(),
            click_geo_location: click.geo_location.clone(),
            click_platform: click.platform.clone(),
        }
    }

    /// The pair key, `(impression_id, click_id)`.
    pub fn pair_key(&self) -> (&str, &str) {
        (&self.impression_id, &self.click_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn impression() -> Impression {
        Impression {
            ad_id: "ad-1".into(),
            impression_id: "imp-1".into(),
            campaign_id: "camp-1".into(),
            publisher_id: "pub-1".into(),
            event_time_ms: 1_795_219_200_123,
            device_type: "mobile".into(),
            geo_location: "US".into(),
            platform: "ios".into(),
            ad_type: "banner".into(),
            bid_price: 12.345_678_901_234_567,
        }
    }

    #[test]
    fn a_record_put_back_is_flagged_and_otherwise_unchanged() {
        let imp = impression();
        let click = Click {
            click_id: "clk-1".into(),
            click_id_derived: false,
            impression_id: "imp-1".into(),
            ad_id: "ad-1".into(),
            campaign_id: "camp-1".into(),
            publisher_id: "pub-1".into(),
            event_time_ms: 1_795_219_201_000,
            device_type: "mobile".into(),
            geo_location: "US".into(),
            platform: "ios".into(),
            click_price: 0.1,
        };
        for record in [
            JoinedStreamRecord::Click(JoinedRecord::new(&imp, &click)),
            JoinedStreamRecord::Impression(ImpressionRecord::new(&imp, false)),
            JoinedStreamRecord::Impression(ImpressionRecord::new(&imp, true)),
        ] {
            let bytes = serde_json::to_vec(&record).unwrap();
            let flagged = flag_recovered_bytes(&bytes).expect("a joined record");
            let back: JoinedStreamRecord = serde_json::from_slice(&flagged).unwrap();
            assert!(back.recovered());
            let mut want = record.clone();
            want.set_recovered();
            assert_eq!(back, want, "only the flag changes");
        }
        // A field this version does not know survives.
        let mut v = serde_json::to_value(JoinedStreamRecord::Impression(ImpressionRecord::new(
            &imp, false,
        )))
        .unwrap();
        v["added_later"] = serde_json::json!({"x": 1});
        let flagged: serde_json::Value = serde_json::from_slice(
            &flag_recovered_bytes(&serde_json::to_vec(&v).unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(flagged["added_later"]["x"], 1);
        assert_eq!(flagged["recovered"], true);
    }

    #[test]
    fn packs_hold_every_impression_in_order_within_the_size_limit_and_flag_as_a_whole() {
        let records: Vec<ImpressionRecord> = (0..500)
            .map(|n| {
                let mut imp = impression();
                imp.impression_id = format!("imp-{n}");
                ImpressionRecord::new(&imp, n % 7 == 0)
            })
            .collect();
        let packs = pack_impressions(&records);
        assert!(packs.len() > 1, "500 impressions need more than one pack");
        let mut back = Vec::new();
        for (bytes, count) in &packs {
            assert!(bytes.len() <= MAX_PACK_BYTES, "{}", bytes.len());
            let wire: JoinedWire = serde_json::from_slice(bytes).unwrap();
            let inner = wire.into_records();
            assert_eq!(inner.len(), *count);
            let flagged: JoinedWire =
                serde_json::from_slice(&flag_recovered_bytes(bytes).unwrap()).unwrap();
            assert!(flagged
                .into_records()
                .iter()
                .all(JoinedStreamRecord::recovered));
            back.extend(inner);
        }
        let want: Vec<JoinedStreamRecord> = records
            .into_iter()
            .map(JoinedStreamRecord::Impression)
            .collect();
        assert_eq!(back, want);
        // A single record is still a record on the wire.
        let one = serde_json::to_vec(&want[3]).unwrap();
        let wire: JoinedWire = serde_json::from_slice(&one).unwrap();
        assert_eq!(wire.into_records(), vec![want[3].clone()]);
    }

    #[test]
    fn bytes_that_are_not_a_joined_record_are_left_alone() {
        for data in [
            &b"not json"[..],
            b"[1,2]",
            br#"{"impression_id":"imp-1"}"#,
            br#"{"type":"view","impression_id":"imp-1"}"#,
            br#"{"type":"impressions","impressions":[1]}"#,
            br#"{"type":"impressions"}"#,
            b"\xff\xfe",
        ] {
            assert_eq!(flag_recovered_bytes(data), None, "{data:?}");
        }
    }
}
