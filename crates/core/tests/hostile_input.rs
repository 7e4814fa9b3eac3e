//! Hostile input: the corpus in `tests/corpus/hostile/` (one file per case, the reason each
//! must get in `expected.json`, made by `tools/make_events.py`), and the decoders fuzzed with
//! proptest for panics. A panic found here becomes a corpus file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use adpipe_core::enricher::decode_joined;
use adpipe_core::model::{Event, RecordKind};
use adpipe_core::validate::{decode, Rejection, TimeBounds};
use proptest::prelude::*;
use serde_json::{json, Value};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/corpus/hostile")
}

/// Every case of the corpus: name, kind, bytes, expected reason (`None`: accepted).
fn corpus() -> Vec<(String, RecordKind, Vec<u8>, Option<String>)> {
    let text = std::fs::read_to_string(corpus_dir().join("expected.json")).unwrap();
    let expected: BTreeMap<String, Value> = serde_json::from_str(&text).unwrap();
    expected
        .into_iter()
        .map(|(name, e)| {
            let kind = match e["kind"].as_str() {
                Some("impression") => RecordKind::Impression,
                Some("click") => RecordKind::Click,
                other => panic!("{name}: unknown kind {other:?}"),
            };
            let bytes = std::fs::read(corpus_dir().join(format!("{name}.bin"))).unwrap();
            (name, kind, bytes, e["reason"].as_str().map(str::to_owned))
        })
        .collect()
}

/// The earliest arrival of a corpus record in `events/hostile-*.json` (2026-11-20T10:15:30Z).
const ARRIVAL_MS: i64 = 1_795_169_730_000;

/// What the joiner decides for a record: decoding, then the default event-time bounds.
fn admit(kind: RecordKind, bytes: &[u8]) -> Result<(), Rejection> {
    let time_ms = decode(kind, bytes)?.event_time_ms();
    TimeBounds::default().check("event_time", time_ms, Some(ARRIVAL_MS))
}

#[test]
fn every_corpus_case_gets_its_reason() {
    let cases = corpus();
    assert!(cases.len() >= 60, "the corpus is there: {}", cases.len());
    let mut wrong = Vec::new();
    for (name, kind, bytes, want) in &cases {
        let got = admit(*kind, bytes)
            .err()
            .map(|r| r.reason.as_str().to_owned());
        if &got != want {
            wrong.push(format!("{name}: expected {want:?}, got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_corpus_covers_every_input_reason() {
    let reasons: std::collections::BTreeSet<String> =
        corpus().into_iter().filter_map(|c| c.3).collect();
    for r in [
        "invalid_utf8",
        "invalid_json",
        "not_an_object",
        "missing_field",
        "null_field",
        "wrong_type",
        "empty_id",
        "empty_field",
        "id_too_long",
        "field_too_long",
        "invalid_id",
        "negative_price",
        "invalid_time",
        "event_time_too_early",
        "event_time_in_future",
    ] {
        assert!(reasons.contains(r), "no corpus case for {r}");
    }
}

fn valid_impression() -> Value {
    json!({
        "ad_id": "ad-1", "impression_id": "imp-1", "campaign_id": "camp-1",
        "publisher_id": "pub-1", "event_time": "2026-11-20T10:15:30.123Z",
        "device_type": "mobile", "geo_location": "US", "platform": "android",
        "ad_type": "banner", "bid_price": 62.5
    })
}

/// Arbitrary JSON values, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        // Strings near the time format, to reach the time parser's corners.
        "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,12})?(Z|z|[+-][0-9]{2}:?[0-9]{2})?"
            .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Any bytes: a decision, never a panic.
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(RecordKind::Impression, &bytes);
        let _ = decode(RecordKind::Click, &bytes);
        let _ = decode_joined(&bytes);
    }

    /// A valid record with one field replaced by any JSON value, or removed: a decision,
    /// never a panic; an accepted record holds what the input said.
    #[test]
    fn a_valid_record_with_a_field_replaced_never_panics(
        field in prop::sample::select(vec![
            "ad_id", "impression_id", "campaign_id", "publisher_id", "event_time",
            "device_type", "geo_location", "platform", "ad_type", "bid_price", "click_id", "extra",
        ]),
        value in prop::option::of(any_json()),
    ) {
        let mut v = valid_impression();
        match &value {
            Some(x) => { v[field] = x.clone(); }
            None => { v.as_object_mut().unwrap().remove(field); }
        }
        let bytes = serde_json::to_vec(&v).unwrap();
        if let Ok(Event::Impression(imp)) = decode(RecordKind::Impression, &bytes) {
            prop_assert_eq!(Value::String(imp.impression_id), v["impression_id"].clone());
            prop_assert!(imp.bid_price >= 0.0 && imp.bid_price.is_finite());
        }
        let mut c = v.clone();
        c["click_price"] = json!(0.5);
        let _ = decode(RecordKind::Click, &serde_json::to_vec(&c).unwrap());
    }

    /// Valid JSON bytes cut or with one byte changed: a decision, never a panic.
    #[test]
    fn a_mangled_valid_record_never_panics(cut in 0usize..220, at in 0usize..220, byte in any::<u8>()) {
        let mut bytes = serde_json::to_vec(&valid_impression()).unwrap();
        let at = at % bytes.len();
        bytes[at] = byte;
        bytes.truncate(cut.max(1));
        let _ = decode(RecordKind::Impression, &bytes);
        let _ = decode_joined(&bytes);
    }
}
