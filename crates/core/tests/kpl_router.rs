//! KPL-aggregated input through the router: whatever way a producer packs its records (plain,
//! aggregated in groups of any size, or both mixed), the keyed stream carries the same events in
//! the same order per bucket, each user record that is invalid is dead-lettered on its own at its
//! sub-sequence number, an unreadable aggregate is dead-lettered once, whole, and a failure names
//! the aggregate's own position.

use std::collections::BTreeMap;

use adpipe_core::in_memory::{MemoryDeadLetterSink, MemoryRecordSink};
use adpipe_core::join::router::{unpack, BatchRouter};
use adpipe_core::kpl::{aggregate, MAGIC};
use adpipe_core::model::{InputRecord, SourcePosition};
use adpipe_core::ports::{EntryResult, OutRecord, PortError, RecordSink};
use adpipe_core::rng::Rng;
use adpipe_core::testkit::{test_config, Scenario, ScenarioSize};
use proptest::prelude::*;

fn record(stream: &str, seq: usize, data: Vec<u8>) -> InputRecord {
    InputRecord {
        position: SourcePosition {
            stream: stream.into(),
            shard: "shardId-000000000000".into(),
            sequence_number: format!("4960{seq:020}"),
            sub_sequence_number: None,
        },
        data,
        invalid_base64: None,
        arrival_ms: None,
    }
}

/// The stream's user records as Kinesis records: runs of random length aggregated (a run of
/// one left plain half the time), so plain and aggregated records mix.
fn packed(stream: &str, user: &[Vec<u8>], rng: &mut Rng, max_group: usize) -> Vec<InputRecord> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < user.len() {
        let n = (1 + rng.below(max_group as u64) as usize).min(user.len() - i);
        let group = &user[i..i + n];
        let data = if n == 1 && rng.below(2) == 0 {
            group[0].clone()
        } else {
            aggregate(group.iter().map(|d| ("pk", d.as_slice())))
        };
        out.push(record(stream, out.len(), data));
        i += n;
    }
    out
}

/// The events on the keyed stream per bucket (partition key), in order, without positions.
fn keyed_events(sink: &MemoryRecordSink) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in sink.records() {
        for e in unpack(&r.data).unwrap() {
            let event = serde_json::to_string(&(&e.impression, &e.click)).unwrap();
            out.entry(r.partition_key.clone()).or_default().push(event);
        }
    }
    out
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn aggregated_or_plain_the_router_puts_the_same_events_on_the_keyed_stream(
        seed in any::<u64>(),
        impressions in 1usize..30,
        clicks in 0usize..40,
        max_group in 1usize..12,
    ) {
        let s = Scenario::generate(seed, ScenarioSize { impressions, clicks, duplicate_rate: 0.2 }, "");
        let mut rng = Rng::new(seed);
        let route = |imps: Vec<InputRecord>, clicks: Vec<InputRecord>| {
            let router = BatchRouter::new(MemoryRecordSink::default(), MemoryDeadLetterSink::default(), test_config(2));
            let (a, b) = runtime().block_on(async {
                (router.process(&imps, 0).await, router.process(&clicks, 0).await)
            });
            (router, a, b)
        };
        let plain = |stream: &str, user: &[Vec<u8>]| -> Vec<InputRecord> {
            user.iter().enumerate().map(|(i, d)| record(stream, i, d.clone())).collect()
        };
        let (p, pa, pb) = route(plain("impressions", &s.impression_stream), plain("clicks", &s.click_stream));
        let agg_imps = packed("impressions", &s.impression_stream, &mut rng, max_group);
        let agg_clicks = packed("clicks", &s.click_stream, &mut rng, max_group);
        let (k, ka, kb) = route(agg_imps.clone(), agg_clicks.clone());

        prop_assert_eq!(keyed_events(&k.sink), keyed_events(&p.sink));
        for (plain, agg, records) in [(&pa, &ka, &agg_imps), (&pb, &kb, &agg_clicks)] {
            prop_assert_eq!(agg.first_failure, None);
            prop_assert_eq!(agg.counts.records_in, records.len() as u64);
            prop_assert_eq!(agg.counts.impressions, plain.counts.impressions);
            prop_assert_eq!(agg.counts.clicks, plain.counts.clicks);
            let aggregated: u64 = records
                .iter()
                .filter(|r| r.data.starts_with(&MAGIC))
                .map(|r| adpipe_core::kpl::deaggregate(&r.data).unwrap().len() as u64)
                .sum();
            prop_assert_eq!(agg.counts.user_records, aggregated);
        }
        prop_assert!(k.dead_letters.letters().is_empty());
    }
}

fn impression(id: &str) -> Vec<u8> {
    format!(
        r#"{{"ad_id":"ad-1","impression_id":"{id}","campaign_id":"c","publisher_id":"p","event_time":"2026-11-20T10:00:00Z","device_type":"mobile","geo_location":"US","platform":"ios","ad_type":"banner","bid_price":1.0}}"#
    )
    .into_bytes()
}

#[test]
fn bad_user_records_are_dead_lettered_one_by_one_and_a_corrupt_aggregate_once() {
    let mut corrupt = aggregate([("k", &impression("imp-9")[..]), ("k", b"{}")]);
    *corrupt.last_mut().unwrap() ^= 0xff;
    let records = vec![
        record("impressions", 0, impression("imp-1")),
        record(
            "impressions",
            1,
            aggregate([
                ("k", &impression("imp-2")[..]),
                ("k", b"not json"),
                ("k", &impression("imp-3")[..]),
                ("k", b"{\"ad_id\":1}"),
            ]),
        ),
        record("impressions", 2, corrupt),
    ];
    let router = BatchRouter::new(
        MemoryRecordSink::default(),
        MemoryDeadLetterSink::default(),
        test_config(2),
    );
    let report = runtime().block_on(router.process(&records, 0));
    assert_eq!(report.first_failure, None);
    assert_eq!(
        (
            report.counts.records_in,
            report.counts.user_records,
            report.counts.impressions
        ),
        (3, 4, 3)
    );
    assert_eq!(report.counts.rejected_total(), 3);
    let letters = router.dead_letters.letters();
    let keys: Vec<&str> = letters
        .keys()
        .map(|k| k.rsplit('/').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        vec![
            "496000000000000000000001.1.json",
            "496000000000000000000001.3.json",
            "496000000000000000000002.json"
        ]
    );
    let body = |k: &str| -> serde_json::Value {
        let (_, v) = letters.iter().find(|(key, _)| key.ends_with(k)).unwrap();
        serde_json::from_slice(v).unwrap()
    };
    assert_eq!(body("01.1.json")["reason"], "invalid_json");
    assert_eq!(body("01.1.json")["sub_sequence_number"], 1);
    assert_eq!(body("01.1.json")["data"], "not json");
    assert_eq!(body("01.3.json")["reason"], "wrong_type");
    let whole = body("02.json");
    assert_eq!(whole["reason"], "invalid_aggregate");
    assert!(whole["detail"].as_str().unwrap().contains("MD5"));
    assert!(whole.get("sub_sequence_number").is_none());
    assert_eq!(
        whole["data_base64"].as_str().unwrap(),
        base64_of(&records[2].data)
    );
}

fn base64_of(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Refuses every record carrying `imp-3`, as a throttled stream would.
#[derive(Default)]
struct Refusing(MemoryRecordSink);

impl RecordSink for Refusing {
    async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<EntryResult>, PortError> {
        let refused = |r: &OutRecord| {
            unpack(&r.data)
                .unwrap()
                .iter()
                .any(|e| e.impression.as_ref().unwrap().impression_id == "imp-3")
        };
        let ok: Vec<OutRecord> = records.iter().filter(|r| !refused(r)).cloned().collect();
        self.0.put_records(&ok).await?;
        Ok(records
            .iter()
            .map(|r| match refused(r) {
                true => EntryResult::Failed {
                    code: "ProvisionedThroughputExceededException".into(),
                    message: "refused".into(),
                },
                false => EntryResult::Accepted,
            })
            .collect())
    }
}

#[test]
fn a_user_record_not_accepted_redelivers_from_its_aggregate() {
    let records = vec![
        record("impressions", 0, impression("imp-1")),
        record(
            "impressions",
            1,
            aggregate([
                ("k", &impression("imp-2")[..]),
                ("k", &impression("imp-3")[..]),
            ]),
        ),
        record("impressions", 2, impression("imp-4")),
    ];
    let router = BatchRouter::new(
        Refusing::default(),
        MemoryDeadLetterSink::default(),
        test_config(2),
    );
    let report = runtime().block_on(router.process(&records, 0));
    assert_eq!(report.first_failure, Some(1), "{report:?}");
    assert_eq!(report.counts.failed, 2);
}
