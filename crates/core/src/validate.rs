//! Decoding and validation of raw input records into typed events, with a typed reason for
//! every refusal (the reason travels to the dead-letter entry and to the metrics).

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::model::{Click, Event, Impression, RecordKind};
use crate::time::{format_millis, parse_event_time};

/// Longest accepted id, in characters: Kinesis partition keys (the joined stream is keyed by
/// `impression_id`) are limited to 256 characters.
pub const MAX_ID_CHARS: usize = 256;

/// Longest accepted value of a required string field that is not an id (`device_type`,
/// `geo_location`, `platform`, `ad_type`, `event_time`), in bytes of UTF-8. With
/// [`MAX_ID_CHARS`] and [`crate::join::rule::MAX_CLICKS_PER_IMPRESSION`] it bounds every join-state
/// item below DynamoDB's 400 KB item limit by construction.
pub const MAX_FIELD_BYTES: usize = 256;

/// Why a record was refused. `as_str` is the stable name used in metrics and dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The Kinesis envelope's `data` is not valid base64.
    InvalidBase64,
    /// A KPL-aggregated record that cannot be read (a wrong MD5 trailer, a truncated or invalid
    /// protobuf, a key index outside its table, no user record, too many): refused whole.
    InvalidAggregate,
    /// The bytes are not valid UTF-8.
    InvalidUtf8,
    /// The bytes are not one JSON document (syntax error, trailing data, number out of range).
    InvalidJson,
    /// Valid JSON, but not an object.
    NotAnObject,
    /// A required field is absent.
    MissingField,
    /// A required field is `null`.
    NullField,
    /// A field has the wrong JSON type.
    WrongType,
    /// An id field is empty or only white space.
    EmptyId,
    /// A required string field that is not an id (`device_type`, `geo_location`, `platform`,
    /// `ad_type`, `event_time`) is `""`: as invalid as a missing one. `" "` is not empty.
    EmptyField,
    /// An id field is longer than [`MAX_ID_CHARS`].
    IdTooLong,
    /// A required string field that is not an id is longer than [`MAX_FIELD_BYTES`].
    FieldTooLong,
    /// An id field holds a control character, or `campaign_id` (a partition value, so a path
    /// segment in the lake) holds `/` or `\\` or is `.` or `..`.
    InvalidId,
    /// A price is below zero.
    NegativePrice,
    /// A price is not a finite number.
    NonFinitePrice,
    /// `event_time` is not an RFC 3339 timestamp with an offset.
    InvalidTime,
    /// `event_time` (or a joined record's time) is before the earliest accepted event time
    /// ([`TimeBounds::earliest_ms`]): a broken clock, or a backfill older than configured.
    EventTimeTooEarly,
    /// `event_time` is further ahead of the record's arrival on its stream than
    /// [`TimeBounds::max_ahead_ms`]: a producer clock running ahead.
    EventTimeInFuture,
    /// The enricher's batch already touches [`crate::enricher::EnricherSettings::max_days_per_batch`]
    /// distinct event days (each a partition and a file per table); this record's day would be
    /// one more. Bounds the files one batch writes, whatever times it carries.
    TooManyDaysInBatch,
    /// The record came from a stream the function is not configured for.
    UnknownSource,
    /// Same id as a stored event of the same kind, but different content.
    ConflictingDuplicate,
    /// A new click for an impression id that already holds
    /// [`crate::join::rule::MAX_CLICKS_PER_IMPRESSION`] clicks (an unexpanded click macro, a bot):
    /// stored, it would push the join state past DynamoDB's item limit and block the shard.
    TooManyClicks,
    /// The event is older than the deduplication horizon allows checking: it may repeat an
    /// event whose state has expired, so it is never emitted as new.
    PastDedupHorizon,
    /// A record of the keyed stream that the router did not write (not its format).
    InvalidKeyedRecord,
}

impl RejectReason {
    pub const ALL: [RejectReason; 24] = [
        RejectReason::InvalidBase64,
        RejectReason::InvalidAggregate,
        RejectReason::InvalidUtf8,
        RejectReason::InvalidJson,
        RejectReason::NotAnObject,
        RejectReason::MissingField,
        RejectReason::NullField,
        RejectReason::WrongType,
        RejectReason::EmptyId,
        RejectReason::EmptyField,
        RejectReason::IdTooLong,
        RejectReason::FieldTooLong,
        RejectReason::InvalidId,
        RejectReason::NegativePrice,
        RejectReason::NonFinitePrice,
        RejectReason::InvalidTime,
        RejectReason::EventTimeTooEarly,
        RejectReason::EventTimeInFuture,
        RejectReason::TooManyDaysInBatch,
        RejectReason::UnknownSource,
        RejectReason::ConflictingDuplicate,
        RejectReason::TooManyClicks,
        RejectReason::PastDedupHorizon,
        RejectReason::InvalidKeyedRecord,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidBase64 => "invalid_base64",
            RejectReason::InvalidAggregate => "invalid_aggregate",
            RejectReason::InvalidUtf8 => "invalid_utf8",
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::NotAnObject => "not_an_object",
            RejectReason::MissingField => "missing_field",
            RejectReason::NullField => "null_field",
            RejectReason::WrongType => "wrong_type",
            RejectReason::EmptyId => "empty_id",
            RejectReason::EmptyField => "empty_field",
            RejectReason::IdTooLong => "id_too_long",
            RejectReason::FieldTooLong => "field_too_long",
            RejectReason::InvalidId => "invalid_id",
            RejectReason::NegativePrice => "negative_price",
            RejectReason::NonFinitePrice => "non_finite_price",
            RejectReason::InvalidTime => "invalid_time",
            RejectReason::EventTimeTooEarly => "event_time_too_early",
            RejectReason::EventTimeInFuture => "event_time_in_future",
            RejectReason::TooManyDaysInBatch => "too_many_days_in_batch",
            RejectReason::UnknownSource => "unknown_source",
            RejectReason::ConflictingDuplicate => "conflicting_duplicate",
            RejectReason::TooManyClicks => "too_many_clicks",
            RejectReason::PastDedupHorizon => "past_dedup_horizon",
            RejectReason::InvalidKeyedRecord => "invalid_keyed_record",
        }
    }
}

/// A refused record: the typed reason and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

/// The event times the pipeline accepts. Each distinct event day is a partition (and a file per
/// table) in the lake, so a producer with a broken clock could otherwise make one batch write a
/// file for every day from year 0 to 9999.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeBounds {
    /// Earliest accepted event time, epoch ms. Default 2020-01-01T00:00:00Z; lower it (the
    /// `EARLIEST_EVENT_TIME` setting) to backfill older data.
    pub earliest_ms: i64,
    /// How far an event time may be ahead of its record's arrival on the stream, ms.
    /// Default one hour.
    pub max_ahead_ms: i64,
}

/// 2020-01-01T00:00:00Z.
pub const DEFAULT_EARLIEST_EVENT_MS: i64 = 1_577_836_800_000;

impl Default for TimeBounds {
    fn default() -> Self {
        TimeBounds {
            earliest_ms: DEFAULT_EARLIEST_EVENT_MS,
            max_ahead_ms: 3_600_000,
        }
    }
}

impl TimeBounds {
    /// Checks one event time. `arrival_ms` is the record's arrival on its stream (Kinesis'
    /// `approximateArrivalTimestamp`): fixed per record, so a retry decides the same way, unlike
    /// the invocation's clock. Without it only the earliest bound applies.
    pub fn check(
        &self,
        field: &str,
        time_ms: i64,
        arrival_ms: Option<i64>,
    ) -> Result<(), Rejection> {
        if time_ms < self.earliest_ms {
            return Err(Rejection::new(
                RejectReason::EventTimeTooEarly,
                format!(
                    "`{field}` {} is before the earliest accepted event time {}",
                    format_millis(time_ms),
                    format_millis(self.earliest_ms)
                ),
            ));
        }
        if let Some(arrival) = arrival_ms {
            if time_ms - arrival > self.max_ahead_ms {
                return Err(Rejection::new(
                    RejectReason::EventTimeInFuture,
                    format!(
                        "`{field}` {} is more than {} s ahead of the record's arrival {}",
                        format_millis(time_ms),
                        self.max_ahead_ms / 1000,
                        format_millis(arrival)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Decodes one raw record of the given kind. Unknown extra fields are ignored.
pub fn decode(kind: RecordKind, data: &[u8]) -> Result<Event, Rejection> {
    let text = std::str::from_utf8(data).map_err(|e| {
        Rejection::new(
            RejectReason::InvalidUtf8,
            format!("record is not UTF-8: {e}"),
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Rejection::new(
            RejectReason::InvalidJson,
            format!("record is not JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(Rejection::new(
            RejectReason::NotAnObject,
            format!("record is a JSON {}, not an object", json_type(&value)),
        ));
    };
    let f = Fields(&obj);
    match kind {
        RecordKind::Impression => Ok(Event::Impression(Impression {
            ad_id: f.id("ad_id")?,
            impression_id: f.id("impression_id")?,
            campaign_id: f.id("campaign_id")?,
            publisher_id: f.id("publisher_id")?,
            event_time_ms: f.time("event_time")?,
            device_type: f.string("device_type")?,
            geo_location: f.string("geo_location")?,
            platform: f.string("platform")?,
            ad_type: f.string("ad_type")?,
            bid_price: f.price("bid_price")?,
        })),
        RecordKind::Click => {
            let mut click = Click {
                ad_id: f.id("ad_id")?,
                impression_id: f.id("impression_id")?,
                campaign_id: f.id("campaign_id")?,
                publisher_id: f.id("publisher_id")?,
                event_time_ms: f.time("event_time")?,
                device_type: f.string("device_type")?,
                geo_location: f.string("geo_location")?,
                platform: f.string("platform")?,
                click_price: f.price("click_price")?,
                click_id: String::new(),
                click_id_derived: false,
            };
            match f.optional_id("click_id")? {
                Some(id) => click.click_id = id,
                None => {
                    click.click_id = derive_click_id(&click);
                    click.click_id_derived = true;
                }
            }
            Ok(Event::Click(click))
        }
    }
}

/// A deterministic click id from the click's content, for producers that send none.
///
/// Hashes the validated fields (not the raw bytes), so a producer that re-serialises a retried
/// click with another key order or time format still yields the same id. Two clicks identical in
/// every field, to the millisecond, are indistinguishable and count as one.
pub fn derive_click_id(click: &Click) -> String {
    let mut h = Sha256::new();
    for part in [
        click.ad_id.as_str(),
        click.impression_id.as_str(),
        click.campaign_id.as_str(),
        click.publisher_id.as_str(),
        click.device_type.as_str(),
        click.geo_location.as_str(),
        click.platform.as_str(),
    ] {
        // Length-prefix every part so field boundaries cannot be shifted ("ab","c" vs "a","bc").
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.update(click.event_time_ms.to_be_bytes());
    h.update(click.click_price.to_bits().to_be_bytes());
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("d-{hex}")
}

/// The wire JSON of an impression, as a producer sends it (what [`decode`] reads).
pub fn encode_impression(i: &Impression) -> Vec<u8> {
    serde_json::json!({
        "ad_id": i.ad_id, "impression_id": i.impression_id, "campaign_id": i.campaign_id,
        "publisher_id": i.publisher_id, "event_time": format_millis(i.event_time_ms),
        "device_type": i.device_type, "geo_location": i.geo_location, "platform": i.platform,
        "ad_type": i.ad_type, "bid_price": i.bid_price,
    })
    .to_string()
    .into_bytes()
}

/// The wire JSON of a click; a derived id is left out, as a producer without ids sends it.
/// An event as the input JSON it was read from (for dead letters).
pub fn encode_event(event: &Event) -> Vec<u8> {
    match event {
        Event::Impression(i) => encode_impression(i),
        Event::Click(c) => encode_click(c),
    }
}

pub fn encode_click(c: &Click) -> Vec<u8> {
    let mut v = serde_json::json!({
        "ad_id": c.ad_id, "impression_id": c.impression_id, "campaign_id": c.campaign_id,
        "publisher_id": c.publisher_id, "event_time": format_millis(c.event_time_ms),
        "device_type": c.device_type, "geo_location": c.geo_location, "platform": c.platform,
        "click_price": c.click_price,
    });
    if !c.click_id_derived {
        v["click_id"] = serde_json::json!(c.click_id);
    }
    v.to_string().into_bytes()
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn present(&self, name: &str) -> Result<&Value, Rejection> {
        match self.0.get(name) {
            None => Err(Rejection::new(
                RejectReason::MissingField,
                format!("required field `{name}` is missing"),
            )),
            Some(Value::Null) => Err(Rejection::new(
                RejectReason::NullField,
                format!("required field `{name}` is null"),
            )),
            Some(v) => Ok(v),
        }
    }

    /// A required string field: `""` counts as missing (docs/SCHEMAS.md), white space does not.
    fn string(&self, name: &str) -> Result<String, Rejection> {
        let s = as_string(name, self.present(name)?)?;
        if s.is_empty() {
            return Err(empty_field(name));
        }
        if s.len() > MAX_FIELD_BYTES {
            return Err(Rejection::new(
                RejectReason::FieldTooLong,
                format!(
                    "field `{name}` is {} bytes long, more than {MAX_FIELD_BYTES}",
                    s.len()
                ),
            ));
        }
        Ok(s)
    }

    fn id(&self, name: &str) -> Result<String, Rejection> {
        check_id(name, as_string(name, self.present(name)?)?)
    }

    fn optional_id(&self, name: &str) -> Result<Option<String>, Rejection> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => check_id(name, as_string(name, v)?).map(Some),
        }
    }

    fn time(&self, name: &str) -> Result<i64, Rejection> {
        let s = self.string(name)?;
        parse_event_time(&s).map_err(|e| Rejection::new(RejectReason::InvalidTime, e.to_string()))
    }

    fn price(&self, name: &str) -> Result<f64, Rejection> {
        let v = self.present(name)?;
        let Some(p) = v.as_f64() else {
            return Err(Rejection::new(
                RejectReason::WrongType,
                format!("field `{name}` must be a number, found {}", json_type(v)),
            ));
        };
        if !p.is_finite() {
            return Err(Rejection::new(
                RejectReason::NonFinitePrice,
                format!("field `{name}` is not finite"),
            ));
        }
        if p < 0.0 {
            return Err(Rejection::new(
                RejectReason::NegativePrice,
                format!("field `{name}` is negative ({p})"),
            ));
        }
        // -0.0 is a valid zero price; store it as +0.0 so equal records compare equal.
        Ok(if p == 0.0 { 0.0 } else { p })
    }
}

fn as_string(name: &str, v: &Value) -> Result<String, Rejection> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(Rejection::new(
            RejectReason::WrongType,
            format!(
                "field `{name}` must be a string, found {}",
                json_type(other)
            ),
        )),
    }
}

/// The refusal of a required string field holding `""`.
pub fn empty_field(name: &str) -> Rejection {
    Rejection::new(
        RejectReason::EmptyField,
        format!("required field `{name}` is empty"),
    )
}

fn check_id(name: &str, id: String) -> Result<String, Rejection> {
    if id.trim().is_empty() {
        return Err(Rejection::new(
            RejectReason::EmptyId,
            format!("id field `{name}` is empty"),
        ));
    }
    if id.chars().count() > MAX_ID_CHARS {
        return Err(Rejection::new(
            RejectReason::IdTooLong,
            format!("id field `{name}` is longer than {MAX_ID_CHARS} characters"),
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(Rejection::new(
            RejectReason::InvalidId,
            format!("id field `{name}` contains a control character"),
        ));
    }
    if name == "campaign_id" && (id.contains(['/', '\\']) || id == "." || id == "..") {
        return Err(Rejection::new(
            RejectReason::InvalidId,
            format!("`campaign_id` {id:?} is a lake partition value and may not be a path (`/`, `\\`, `.`, `..`)"),
        ));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn impression_json() -> Value {
        json!({
            "ad_id": "ad-1", "impression_id": "imp-1", "campaign_id": "camp-1",
            "publisher_id": "pub-1", "event_time": "2026-11-20T10:15:30.123Z",
            "device_type": "mobile", "geo_location": "US", "platform": "android",
            "ad_type": "banner", "bid_price": 12.5
        })
    }

    fn click_json() -> Value {
        json!({
            "ad_id": "ad-1", "impression_id": "imp-1", "campaign_id": "camp-1",
            "publisher_id": "pub-1", "event_time": "2026-11-20T10:15:40Z",
            "device_type": "mobile", "geo_location": "US", "platform": "android",
            "click_price": 0.75
        })
    }

    fn reason(kind: RecordKind, v: &Value) -> RejectReason {
        decode(kind, v.to_string().as_bytes()).unwrap_err().reason
    }

    #[test]
    fn valid_impression_decodes_and_ignores_unknown_fields() {
        let mut v = impression_json();
        v["extra"] = json!({"nested": [1, 2, 3]});
        let Event::Impression(i) =
            decode(RecordKind::Impression, v.to_string().as_bytes()).unwrap()
        else {
            panic!("expected an impression")
        };
        assert_eq!(i.impression_id, "imp-1");
        assert_eq!(i.bid_price, 12.5);
        assert_eq!(i.event_time_ms, 1_795_169_730_123);
    }

    #[test]
    fn click_without_id_gets_a_stable_derived_id() {
        let a = decode(RecordKind::Click, click_json().to_string().as_bytes()).unwrap();
        // Same content, other key order and time spelling: same id.
        let reordered = r#"{"click_price":0.75,"platform":"android","geo_location":"US",
            "device_type":"mobile","event_time":"2026-11-20T11:15:40.000+01:00",
            "publisher_id":"pub-1","campaign_id":"camp-1","impression_id":"imp-1","ad_id":"ad-1"}"#;
        let b = decode(RecordKind::Click, reordered.as_bytes()).unwrap();
        let (Event::Click(a), Event::Click(b)) = (a, b) else {
            panic!("expected clicks")
        };
        assert!(a.click_id_derived);
        assert_eq!(a.click_id, b.click_id);
        let mut later = click_json();
        later["event_time"] = json!("2026-11-20T10:15:40.001Z");
        let Event::Click(c) = decode(RecordKind::Click, later.to_string().as_bytes()).unwrap()
        else {
            panic!("expected a click")
        };
        assert_ne!(a.click_id, c.click_id);
    }

    #[test]
    fn producer_click_id_is_kept() {
        let mut v = click_json();
        v["click_id"] = json!("clk-9");
        let Event::Click(c) = decode(RecordKind::Click, v.to_string().as_bytes()).unwrap() else {
            panic!("expected a click")
        };
        assert_eq!(c.click_id, "clk-9");
        assert!(!c.click_id_derived);
    }

    #[test]
    fn each_kind_of_bad_record_gets_its_reason() {
        use RejectReason::*;
        let imp = RecordKind::Impression;
        let bytes = |b: &[u8]| decode(imp, b).unwrap_err().reason;
        assert_eq!(bytes(b"\xff\xfe{}"), InvalidUtf8);
        assert_eq!(bytes(b"not json"), InvalidJson);
        assert_eq!(bytes(b"{\"a\":1} trailing"), InvalidJson);
        assert_eq!(bytes(br#"{"bid_price": 1e400}"#), InvalidJson);
        assert_eq!(bytes(b"[1,2]"), NotAnObject);
        assert_eq!(bytes(b"42"), NotAnObject);

        let with = |field: &str, value: Value| {
            let mut v = impression_json();
            v[field] = value;
            reason(imp, &v)
        };
        let mut missing = impression_json();
        missing.as_object_mut().unwrap().remove("campaign_id");
        assert_eq!(reason(imp, &missing), MissingField);
        assert_eq!(with("ad_id", Value::Null), NullField);
        assert_eq!(with("ad_id", json!(17)), WrongType);
        assert_eq!(with("bid_price", json!("1.5")), WrongType);
        assert_eq!(with("impression_id", json!("")), EmptyId);
        assert_eq!(with("impression_id", json!("   ")), EmptyId);
        assert_eq!(with("impression_id", json!("x".repeat(257))), IdTooLong);
        assert_eq!(with("bid_price", json!(-0.01)), NegativePrice);
        assert_eq!(
            with("event_time", json!("2026-13-01T00:00:00Z")),
            InvalidTime
        );
        assert_eq!(with("event_time", json!(1_763_633_730)), WrongType);
        for field in [
            "device_type",
            "geo_location",
            "platform",
            "ad_type",
            "event_time",
        ] {
            assert_eq!(with(field, json!("")), EmptyField, "{field}");
        }

        let mut click = click_json();
        click["click_id"] = json!("");
        assert_eq!(reason(RecordKind::Click, &click), EmptyId);
        click["click_id"] = json!(5);
        assert_eq!(reason(RecordKind::Click, &click), WrongType);
    }

    #[test]
    fn blank_but_not_empty_strings_are_values_and_unknown_devices_are_accepted() {
        for device in [" ", "\t", "smart-fridge"] {
            let mut v = impression_json();
            v["device_type"] = json!(device);
            let Event::Impression(i) =
                decode(RecordKind::Impression, v.to_string().as_bytes()).unwrap()
            else {
                panic!("expected an impression")
            };
            assert_eq!(i.device_type, device);
        }
        for field in ["device_type", "geo_location", "platform"] {
            let mut c = click_json();
            c[field] = json!("");
            assert_eq!(
                reason(RecordKind::Click, &c),
                RejectReason::EmptyField,
                "{field}"
            );
        }
    }

    #[test]
    fn zero_and_negative_zero_prices_are_valid_and_equal() {
        let mut a = impression_json();
        a["bid_price"] = json!(0.0);
        let mut b = impression_json();
        b["bid_price"] = json!(-0.0);
        let a = decode(RecordKind::Impression, a.to_string().as_bytes()).unwrap();
        let b = decode(RecordKind::Impression, b.to_string().as_bytes()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn event_times_outside_the_bounds_are_refused_with_their_own_reasons() {
        let b = TimeBounds::default();
        let arrival = 1_795_169_730_000; // 2026-11-20T10:15:30Z
        assert!(b.check("event_time", arrival, Some(arrival)).is_ok());
        assert!(b.check("event_time", b.earliest_ms, Some(arrival)).is_ok());
        assert!(b
            .check("event_time", arrival + 3_600_000, Some(arrival))
            .is_ok());
        let reason = |t: i64, a: Option<i64>| b.check("event_time", t, a).unwrap_err().reason;
        assert_eq!(
            reason(arrival + 3_600_001, Some(arrival)),
            RejectReason::EventTimeInFuture
        );
        assert_eq!(
            reason(b.earliest_ms - 1, Some(arrival)),
            RejectReason::EventTimeTooEarly
        );
        assert_eq!(
            reason(-62_135_596_800_000, None),
            RejectReason::EventTimeTooEarly
        );
        // No arrival known: only the earliest bound applies.
        assert!(b.check("event_time", arrival * 2, None).is_ok());
        // A backfill lowers the bound.
        let backfill = TimeBounds {
            earliest_ms: 0,
            ..b
        };
        assert!(backfill
            .check("event_time", 946_684_800_000, Some(arrival))
            .is_ok());
    }

    #[test]
    fn string_fields_longer_than_the_limit_are_refused() {
        for field in ["device_type", "geo_location", "platform", "ad_type"] {
            let mut at_limit = impression_json();
            at_limit[field] = json!("x".repeat(MAX_FIELD_BYTES));
            assert!(decode(RecordKind::Impression, at_limit.to_string().as_bytes()).is_ok());
            let mut over = impression_json();
            // Bytes, not characters: 65 four-byte characters are 260 bytes.
            over[field] = json!("\u{1d11e}".repeat(MAX_FIELD_BYTES / 4 + 1));
            let err = decode(RecordKind::Impression, over.to_string().as_bytes()).unwrap_err();
            assert_eq!(err.reason, RejectReason::FieldTooLong, "{field}");
        }
        let mut time = impression_json();
        time["event_time"] = json!(format!("2026-11-20T10:15:30.{}Z", "1".repeat(300)));
        let err = decode(RecordKind::Impression, time.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.reason, RejectReason::FieldTooLong);
    }

    #[test]
    fn reason_names_are_unique() {
        let names: std::collections::BTreeSet<_> =
            RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), RejectReason::ALL.len());
    }
}
