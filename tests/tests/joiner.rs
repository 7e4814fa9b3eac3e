//! The joiner against a real AWS-compatible endpoint (moto on loopback): DynamoDB state, the
//! Kinesis output stream and the S3 dead-letter destination, driven by the `events/` fixtures.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use adpipe_aws::{Clients, DynamoDbJoinState, KinesisRecordSink, S3DeadLetterSink};
use adpipe_core::batch::BatchJoiner;
use adpipe_core::config::JoinerConfig;
use adpipe_core::memory::{MemoryDeadLetterSink, MemoryRecordSink};
use adpipe_core::model::{JoinedRecord, JoinedStreamRecord};
use adpipe_core::ports::{EntryResult, OutRecord, PortError, RecordSink};
use adpipe_core::testkit::{
    decode_joined, run_concurrently, run_to_completion, FaultPlan, FaultyState, Scenario,
    ScenarioSize,
};
use adpipe_it::{
    create_bucket, create_state_table, create_stream, hostile_corpus, load_batch, load_event,
    read_objects, read_stream, unique, LocalAws,
};
use adpipe_joiner::{aws_joiner, handle};
use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_sdk_dynamodb::types::AttributeValue;

/// 2026-11-21T00:00:00Z, the invocations' clock.
const NOW_MS: i64 = 1_795_219_200_000;

struct Env {
    clients: Clients,
    config: JoinerConfig,
}

async fn env(extra: &[(&str, &str)]) -> Env {
    let clients = LocalAws::shared().clients().await;
    let (table, joined, bucket) = (unique("state"), unique("joined"), unique("dlq"));
    create_state_table(&clients, &table).await.unwrap();
    create_stream(&clients, &joined, 1).await.unwrap();
    create_bucket(&clients, &bucket).await.unwrap();
    let mut vars: BTreeMap<String, String> = [
        ("IMPRESSIONS_STREAM_NAME", "adpipe-local-impressions"),
        (
            "CLICKS_STREAM_NAME",
            "arn:aws:kinesis:us-east-1:123456789012:stream/adpipe-local-clicks",
        ),
        ("JOINED_STREAM_NAME", joined.as_str()),
        ("STATE_TABLE_NAME", table.as_str()),
        ("DEAD_LETTER_BUCKET", bucket.as_str()),
        ("EMIT_MAX_ATTEMPTS", "2"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    vars.retain(|_, v| !v.is_empty());
    let config = JoinerConfig::from_lookup(|k| vars.get(k).cloned()).unwrap();
    Env { clients, config }
}

/// The impression ids forwarded to the joined stream, with how many copies were not flagged.
async fn forwarded_impressions(env: &Env) -> BTreeMap<String, (u32, u32)> {
    let data = read_stream(&env.clients, &env.config.joined_stream)
        .await
        .unwrap();
    let mut out: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for d in data {
        if let JoinedStreamRecord::Impression(i) = serde_json::from_slice(&d).unwrap() {
            let e = out.entry(i.impression_id).or_default();
            if i.recovered {
                e.1 += 1
            } else {
                e.0 += 1
            }
        }
    }
    out
}

async fn joined_records(env: &Env) -> Vec<JoinedRecord> {
    let data = read_stream(&env.clients, &env.config.joined_stream)
        .await
        .unwrap();
    let records: Vec<OutRecord> = data
        .into_iter()
        .map(|d| OutRecord {
            partition_key: String::new(),
            data: d,
            explicit_hash_key: None,
        })
        .collect();
    decode_joined(&records)
}

async fn item(env: &Env, impression_id: &str) -> std::collections::HashMap<String, AttributeValue> {
    env.clients
        .dynamodb
        .get_item()
        .table_name(&env.config.state_table)
        .key("pk", AttributeValue::S(impression_id.into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap_or_default()
}

fn keys(records: &[JoinedRecord]) -> Vec<(&str, &str)> {
    records.iter().map(JoinedRecord::pair_key).collect()
}

/// The id `events/clicks.json` derives for its click without `click_id`.
fn derived_click_id(records: &[JoinedRecord]) -> String {
    records
        .iter()
        .find(|r| r.click_id_derived)
        .map(|r| r.click_id.clone())
        .expect("the fixture's id-less click joined")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_before_impressions_join_once_each_and_redelivery_emits_nothing() {
    let env = env(&[]).await;
    let joiner = aws_joiner(&env.clients, env.config.clone());
    let clicks = load_event("clicks.json");
    let impressions = load_event("impressions.json");

    // Every click arrives before its impression: they are buffered, and joined on arrival.
    let (response, report) = handle(&joiner, &clicks, NOW_MS).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(report.counts.buffered, 6);
    assert_eq!(report.counts.duplicates, 1);
    let (response, report) = handle(&joiner, &impressions, NOW_MS + 1_000).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(report.counts.joined, 3);
    assert_eq!(report.counts.duplicates, 1);
    assert_eq!(
        report.counts.unmatched, 2,
        "clk-2 outside the window, clk-5 another ad"
    );

    let out = joined_records(&env).await;
    let derived = derived_click_id(&out);
    let mut expected = vec![
        ("imp-1001", "clk-1"),
        ("imp-1001", derived.as_str()),
        ("imp-1003", "clk-3"),
    ];
    expected.sort();
    assert_eq!(keys(&out), expected);
    let first = out.iter().find(|r| r.click_id == "clk-1").unwrap();
    assert_eq!(first.impression_time, "2026-11-20T10:15:00.000Z");
    assert_eq!(first.click_time, "2026-11-20T10:15:12.000Z");
    assert_eq!(first.bid_price, 62.5);
    assert_eq!(first.click_price, 0.5);
    let offset = out.iter().find(|r| r.click_id == "clk-3").unwrap();
    assert_eq!(
        offset.impression_time, "2026-11-20T10:15:10.500Z",
        "+02:00 normalised to UTC"
    );
    assert_eq!(
        offset.device_type, " desktop ",
        "kept verbatim; the enricher normalises"
    );

    // State: the impression, both clicks, their emitted marks and a TTL past retention + grace.
    let stored = item(&env, "imp-1001").await;
    for attr in [
        "imp",
        "c#clk-1",
        "e#clk-1",
        &format!("c#{derived}"),
        &format!("e#{derived}"),
    ] {
        assert!(
            stored.contains_key(attr),
            "imp-1001 lacks {attr}: {:?}",
            stored.keys()
        );
    }
    let ttl: i64 = stored["ttl"].as_n().unwrap().parse().unwrap();
    assert_eq!(ttl, (NOW_MS + 1_000) / 1000 + 2 * 86_400);
    let orphan = item(&env, "imp-9999").await;
    assert!(orphan.contains_key("c#clk-4") && !orphan.contains_key("imp"));

    // Lambda redelivers both batches: nothing new is emitted, nothing fails.
    for (event, t) in [(&impressions, NOW_MS + 5_000), (&clicks, NOW_MS + 6_000)] {
        let (response, report) = handle(&joiner, event, t).await;
        assert!(response.batch_item_failures.is_empty());
        assert_eq!(report.counts.joined, 0);
        assert_eq!(report.counts.duplicates, report.counts.records_in);
    }
    assert_eq!(joined_records(&env).await.len(), 3);
    // Each impression was forwarded once for the lake; the in-batch producer duplicate of
    // imp-1001 added nothing. Lambda's redelivery of the same records forwards each again,
    // flagged `recovered` (the joiner cannot know whether the first forward got through);
    // the lake lands a flagged copy only if the key is not there yet.
    let forwarded = forwarded_impressions(&env).await;
    let ids: Vec<&str> = forwarded.keys().map(String::as_str).collect();
    assert_eq!(ids, ["imp-1001", "imp-1002", "imp-1003", "imp-1004"]);
    assert!(
        forwarded
            .values()
            .all(|&(first, recovered)| first == 1 && recovered == 1),
        "{forwarded:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_dead_lettered_with_reason_and_do_not_block_the_shard() {
    let env = env(&[]).await;
    let joiner = aws_joiner(&env.clients, env.config.clone());
    let event = load_event("malformed.json");
    let (response, report) = handle(&joiner, &event, NOW_MS).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(report.counts.rejected_total(), 11);
    assert_eq!(
        report.counts.impressions, 1,
        "the valid record after the bad ones is processed"
    );
    assert!(item(&env, "imp-2001").await.contains_key("imp"));

    let letters = read_objects(&env.clients, &env.config.dead_letter_bucket, "dead-letter/")
        .await
        .unwrap();
    let reasons: Vec<(String, String)> = letters
        .iter()
        .map(|(key, body)| {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(v["stream"], "adpipe-local-impressions");
            assert_eq!(v["shard"], "shardId-000000000002");
            assert!(key.ends_with(&format!("/{}.json", v["sequence_number"].as_str().unwrap())));
            (
                v["sequence_number"].as_str().unwrap().to_owned(),
                v["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut by_position: Vec<&str> = Vec::new();
    for record in &event.records[..11] {
        let seq = &record.kinesis.sequence_number;
        by_position.push(
            &reasons
                .iter()
                .find(|(s, _)| s == seq)
                .expect("every bad record has an entry")
                .1,
        );
    }
    assert_eq!(
        by_position,
        [
            "invalid_json",
            "invalid_utf8",
            "not_an_object",
            "invalid_json",
            "missing_field",
            "null_field",
            "wrong_type",
            "empty_id",
            "negative_price",
            "invalid_time",
            "invalid_json"
        ]
    );

    // A redelivery rewrites the same entries: still exactly one per bad record.
    handle(&joiner, &event, NOW_MS + 60_000).await;
    let again = read_objects(&env.clients, &env.config.dead_letter_bucket, "dead-letter/")
        .await
        .unwrap();
    assert_eq!(again.len(), 11);
}

/// The real Kinesis sink, except that entries whose partition key is listed are refused (not
/// forwarded) while `enabled` — a partial `PutRecords` failure.
struct RefuseKeys<K> {
    inner: K,
    keys: HashSet<String>,
    enabled: AtomicBool,
    refused: Mutex<u32>,
}

impl<K: RecordSink> RecordSink for RefuseKeys<K> {
    async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<EntryResult>, PortError> {
        let refuse: Vec<bool> = records
            .iter()
            .map(|r| self.enabled.load(Ordering::SeqCst) && self.keys.contains(&r.partition_key))
            .collect();
        let forward: Vec<OutRecord> = records
            .iter()
            .zip(&refuse)
            .filter(|(_, f)| !**f)
            .map(|(r, _)| r.clone())
            .collect();
        let mut results = if forward.is_empty() {
            Vec::new()
        } else {
            self.inner.put_records(&forward).await?
        }
        .into_iter();
        *self.refused.lock().unwrap() += refuse.iter().filter(|f| **f).count() as u32;
        Ok(refuse
            .iter()
            .map(|&f| {
                if f {
                    EntryResult::Failed {
                        code: "ProvisionedThroughputExceededException".into(),
                        message: "Rate exceeded for shard (injected)".into(),
                    }
                } else {
                    results.next().expect("one result per forwarded entry")
                }
            })
            .collect())
    }
}

fn tail(event: &KinesisEvent, from_sequence: &str) -> KinesisEvent {
    let mut e = event.clone();
    let start = e
        .records
        .iter()
        .position(|r| r.kinesis.sequence_number == from_sequence)
        .unwrap();
    e.records.drain(..start);
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_put_records_failure_checkpoints_at_the_first_failed_record_and_redelivery_completes(
) {
    let env = env(&[]).await;
    let sink = RefuseKeys {
        inner: KinesisRecordSink::new(env.clients.kinesis.clone(), &env.config.joined_stream),
        keys: ["imp-1003".to_owned()].into(),
        enabled: AtomicBool::new(false),
        refused: Mutex::new(0),
    };
    let joiner = BatchJoiner::new(
        DynamoDbJoinState::new(env.clients.dynamodb.clone(), &env.config.state_table),
        sink,
        S3DeadLetterSink::new(env.clients.s3.clone(), &env.config.dead_letter_bucket),
        env.config.clone(),
    );
    let impressions = load_event("impressions.json");
    let clicks = load_event("clicks.json");
    handle(&joiner, &impressions, NOW_MS).await;
    joiner.sink.enabled.store(true, Ordering::SeqCst);

    // clk-3 (record 3) joins imp-1003, whose entry keeps failing: the batch names record 3.
    let (response, report) = handle(&joiner, &clicks, NOW_MS + 1_000).await;
    assert_eq!(response.batch_item_failures.len(), 1);
    let failed_seq = response.batch_item_failures[0]
        .item_identifier
        .clone()
        .unwrap();
    assert_eq!(failed_seq, clicks.records[3].kinesis.sequence_number);
    assert_eq!(
        *joiner.sink.refused.lock().unwrap(),
        2,
        "retried once within the invocation"
    );
    assert_eq!(report.counts.joined, 2);
    assert!(
        !item(&env, "imp-1003").await.contains_key("e#clk-3"),
        "not marked while not emitted"
    );
    assert_eq!(keys(&joined_records(&env).await).len(), 2);

    // Lambda redelivers from the failed record on; the throttle has passed.
    joiner.sink.enabled.store(false, Ordering::SeqCst);
    let (response, report) = handle(&joiner, &tail(&clicks, &failed_seq), NOW_MS + 2_000).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(report.counts.joined, 1);
    let out = joined_records(&env).await;
    let derived = derived_click_id(&out);
    let mut expected = vec![
        ("imp-1001", "clk-1"),
        ("imp-1001", derived.as_str()),
        ("imp-1003", "clk-3"),
    ];
    expected.sort();
    assert_eq!(keys(&out), expected, "every pair exactly once");
    assert!(item(&env, "imp-1003").await.contains_key("e#clk-3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_arriving_after_retention_is_recorded_late_not_joined() {
    let env = env(&[("STATE_RETENTION_SECONDS", "60")]).await;
    let joiner = aws_joiner(&env.clients, env.config.clone());
    handle(&joiner, &load_event("impressions.json"), NOW_MS).await;
    let (response, report) = handle(&joiner, &load_event("clicks.json"), NOW_MS + 61_000).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(report.counts.joined, 0);
    assert_eq!(report.counts.late, 3);
    assert!(joined_records(&env).await.is_empty());
    let late = read_objects(&env.clients, &env.config.dead_letter_bucket, "late/")
        .await
        .unwrap();
    assert_eq!(late.len(), 3);
    let (key, body) = late
        .iter()
        .find(|(k, _)| k.ends_with("/clk-1.json"))
        .unwrap();
    assert_eq!(key, "late/joiner/imp-1001/clk-1.json");
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["kind"], "late");
    assert_eq!(v["arrival_gap_ms"], 61_000);
    assert_eq!(v["pair"]["impression_id"], "imp-1001");
}

#[test]
fn property_any_interleaving_matches_the_reference_join_on_dynamodb() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = rt.block_on(env(&[]));
    let cases: u32 = std::env::var("ADPIPE_DYNAMODB_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let mut runner = TestRunner::new(Config::with_cases(cases));
    let case = std::sync::atomic::AtomicU32::new(0);
    let strategy = (
        any::<u64>(),
        1usize..10,
        1usize..16,
        1usize..8,
        0.0f64..0.3,
        any::<bool>(),
    );
    runner
        .run(
            &strategy,
            |(seed, impressions, clicks, max_batch, fault_rate, concurrent)| {
                // Scenarios share the table; a prefix per case keeps their ids apart.
                let prefix = format!("case{}-", case.fetch_add(1, Ordering::Relaxed));
                let size = ScenarioSize {
                    impressions,
                    clicks,
                    duplicate_rate: 0.25,
                };
                let scenario = Scenario::generate(seed, size, &prefix);
                let joiner = BatchJoiner::new(
                    FaultyState {
                        inner: DynamoDbJoinState::new(
                            env.clients.dynamodb.clone(),
                            &env.config.state_table,
                        ),
                        plan: FaultPlan::new(seed, fault_rate, 20),
                    },
                    MemoryRecordSink::default(),
                    MemoryDeadLetterSink::default(),
                    env.config.clone(),
                );
                // Concurrent pollers make the partners of a pair race in overlapping invocations.
                let run = async {
                    if concurrent {
                        run_concurrently(&joiner, &scenario, seed, max_batch, 5_000).await
                    } else {
                        run_to_completion(&joiner, &scenario, seed, max_batch, 5_000).await
                    }
                };
                rt.block_on(run).map_err(TestCaseError::fail)?;
                let emitted = decode_joined(&joiner.sink.records());
                prop_assert_eq!(emitted, scenario.reference_join(&env.config.rules));
                Ok(())
            },
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_corpus_is_dead_lettered_once_each_with_its_reason_and_the_rest_accepted() {
    let env = env(&[]).await;
    let joiner = aws_joiner(&env.clients, env.config.clone());
    let corpus = hostile_corpus();
    let mut letters = Vec::new();
    let mut accepted = 0;
    for file in ["hostile-impressions.json", "hostile-clicks.json"] {
        let batch = load_batch(file);
        let (response, report) = handle(&joiner, &batch, NOW_MS).await;
        assert!(
            response.batch_item_failures.is_empty(),
            "{file}: {response:?}"
        );
        accepted += report.counts.impressions + report.counts.clicks;
        // A retry of the whole batch changes nothing.
        handle(&joiner, &batch, NOW_MS + 1_000).await;
    }
    for (key, body) in read_objects(&env.clients, &env.config.dead_letter_bucket, "dead-letter/")
        .await
        .unwrap()
    {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(key.ends_with(&format!("/{}.json", v["sequence_number"].as_str().unwrap())));
        use base64::Engine;
        let data = base64::engine::general_purpose::STANDARD
            .decode(v["data_base64"].as_str().unwrap())
            .unwrap();
        letters.push((data, v["reason"].as_str().unwrap().to_owned()));
    }
    let mut want: Vec<(Vec<u8>, String)> = corpus
        .iter()
        .filter_map(|(_, bytes, reason)| reason.clone().map(|r| (bytes.clone(), r)))
        .collect();
    // The record whose envelope `data` is not base64 keeps that text.
    want.push((b"this is not base64!".to_vec(), "invalid_base64".into()));
    letters.sort();
    want.sort();
    assert_eq!(letters.len(), want.len(), "one dead letter per bad record");
    for (got, want) in letters.iter().zip(&want) {
        assert_eq!(
            got.1,
            want.1,
            "{:?}",
            String::from_utf8_lossy(&want.0[..want.0.len().min(80)])
        );
    }
    assert_eq!(letters, want);
    let ok = corpus.iter().filter(|c| c.2.is_none()).count() as u64;
    assert_eq!(accepted, ok, "every accepted case was processed");
    assert!(item(&env, "h-ok-1mb-record").await.contains_key("imp"));
}

/// DynamoDB applies the writes to one item one after another, so N concurrent
/// `list_append(if_not_exists(...))` updates leave N entries. The join state's write order and
/// its pair decisions rest on that; an endpoint that loses an update here can lose a pair.
/// (On plain `moto_server`, which applies concurrent updates without isolation, some round
/// loses entries in most runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_list_appends_to_one_item_keep_every_entry() {
    const ROUNDS: usize = 6;
    const WRITERS: usize = 200;
    let env = env(&[]).await;
    for round in 0..ROUNDS {
        let pk = unique("append");
        let append = |n: usize| {
            env.clients
                .dynamodb
                .update_item()
                .table_name(&env.config.state_table)
                .key("pk", AttributeValue::S(pk.clone()))
                .update_expression("SET #o = list_append(if_not_exists(#o, :empty), :token)")
                .expression_attribute_names("#o", "o")
                .expression_attribute_values(":empty", AttributeValue::L(Vec::new()))
                .expression_attribute_values(
                    ":token",
                    AttributeValue::L(vec![AttributeValue::S(format!("w{n}"))]),
                )
                .send()
        };
        let results = futures::future::join_all((0..WRITERS).map(append)).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let stored = item(&env, &pk).await;
        let entries = stored["o"].as_l().unwrap();
        let tokens: HashSet<&str> = entries.iter().map(|t| t.as_s().unwrap().as_str()).collect();
        assert_eq!(
            (entries.len(), tokens.len()),
            (WRITERS, WRITERS),
            "round {round}: every writer's entry is there, once"
        );
    }
}

/// An impression and many clicks on it, each delivered in its own invocation and all in flight
/// at once: every partner writes to the same item concurrently. Exactly one writer decides
/// each pair, so each click is joined once, never twice, never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_impression_and_click_writes_to_one_item_decide_each_pair_once() {
    use adpipe_core::model::{Click, Impression, InputRecord, SourcePosition};
    use adpipe_core::validate::{encode_click, encode_impression};

    const IMPRESSIONS: usize = 24;
    const CLICKS_EACH: usize = 24;
    let env = env(&[]).await;
    let prefix = unique("race");
    let joiner = BatchJoiner::new(
        DynamoDbJoinState::new(env.clients.dynamodb.clone(), &env.config.state_table),
        MemoryRecordSink::default(),
        MemoryDeadLetterSink::default(),
        env.config.clone(),
    );
    let base = 1_795_169_730_000i64;
    let mut expected = Vec::new();
    let mut records = Vec::new();
    let position = |stream: &str, n: usize| SourcePosition {
        stream: stream.to_owned(),
        // One shard per record: each is its own invocation's only record.
        shard: format!("shardId-{n:012}"),
        sequence_number: format!("4960{n:020}"),
    };
    for i in 0..IMPRESSIONS {
        let imp = Impression {
            ad_id: "ad-1".into(),
            impression_id: format!("{prefix}-imp-{i}"),
            campaign_id: "camp-1".into(),
            publisher_id: "pub-1".into(),
            event_time_ms: base,
            device_type: "mobile".into(),
            geo_location: "US".into(),
            platform: "ios".into(),
            ad_type: "banner".into(),
            bid_price: 1.0,
        };
        let clicks: Vec<Click> = (0..CLICKS_EACH)
            .map(|c| Click {
                ad_id: imp.ad_id.clone(),
                impression_id: imp.impression_id.clone(),
                campaign_id: imp.campaign_id.clone(),
                publisher_id: imp.publisher_id.clone(),
                event_time_ms: base + c as i64 * 1_000,
                device_type: "mobile".into(),
                geo_location: "US".into(),
                platform: "ios".into(),
                click_price: 0.5,
                click_id: format!("{prefix}-clk-{i}-{c}"),
                click_id_derived: false,
            })
            .collect();
        // The impression in the middle of its clicks, so some clicks are sent before it.
        for (n, click) in clicks.iter().enumerate() {
            if n == CLICKS_EACH / 2 {
                let at = records.len();
                records.push(InputRecord {
                    position: position(&env.config.impressions_stream, at),
                    data: encode_impression(&imp),
                    invalid_base64: None,
                    arrival_ms: Some(base),
                });
            }
            let at = records.len();
            records.push(InputRecord {
                position: position(&env.config.clicks_stream, at),
                data: encode_click(click),
                invalid_base64: None,
                arrival_ms: Some(base),
            });
            expected.push(JoinedRecord::new(&imp, click));
        }
    }
    let reports = futures::future::join_all(
        records
            .iter()
            .map(|r| joiner.process(std::slice::from_ref(r), NOW_MS)),
    )
    .await;
    assert!(
        reports.iter().all(|r| r.first_failure.is_none()),
        "every invocation succeeds: {reports:?}"
    );
    let emitted = adpipe_core::testkit::sorted(decode_joined(&joiner.sink.records()));
    assert_eq!(
        keys(&emitted),
        keys(&adpipe_core::testkit::sorted(expected)),
        "each pair decided exactly once"
    );
}

/// Issue: an item past DynamoDB's 400 KB limit blocked the shard. Every field at its longest
/// (ids of 256 four-byte characters, other strings of 256 bytes that double when JSON-escaped)
/// and more clicks on one impression id than the limit, all written concurrently: the first
/// [`MAX_CLICKS_PER_IMPRESSION`] join, the rest are dead-lettered as `too_many_clicks`, no
/// request fails, and the stored item stays below the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_possible_item_stays_below_the_dynamodb_limit_and_extra_clicks_are_dead_lettered(
) {
    use adpipe_aws::dynamodb::item_size;
    use adpipe_core::join::MAX_CLICKS_PER_IMPRESSION;
    use adpipe_core::model::{Click, Impression, InputRecord, SourcePosition};
    use adpipe_core::validate::{encode_click, encode_impression, MAX_FIELD_BYTES, MAX_ID_CHARS};

    let env = env(&[]).await;
    // An id of exactly MAX_ID_CHARS characters, most of them four bytes long.
    let id = |head: String| -> String {
        let tail = MAX_ID_CHARS - head.chars().count();
        format!("{head}{}", "\u{1d11e}".repeat(tail))
    };
    let quotes = "\"".repeat(MAX_FIELD_BYTES);
    let base = 1_795_169_730_000i64;
    let imp = Impression {
        ad_id: id("ad-".into()),
        impression_id: id(unique("big")),
        campaign_id: id("camp-".into()),
        publisher_id: id("pub-".into()),
        event_time_ms: base,
        device_type: quotes.clone(),
        geo_location: quotes.clone(),
        platform: quotes.clone(),
        ad_type: quotes.clone(),
        bid_price: 1.0,
    };
    let extra = 8;
    let clicks: Vec<Click> = (0..MAX_CLICKS_PER_IMPRESSION + extra)
        .map(|c| Click {
            ad_id: imp.ad_id.clone(),
            impression_id: imp.impression_id.clone(),
            campaign_id: imp.campaign_id.clone(),
            publisher_id: imp.publisher_id.clone(),
            event_time_ms: base + c as i64 * 100,
            device_type: quotes.clone(),
            geo_location: quotes.clone(),
            platform: quotes.clone(),
            click_price: 0.5,
            click_id: id(format!("clk-{c}-")),
            click_id_derived: false,
        })
        .collect();
    let position = |stream: &str, n: usize| SourcePosition {
        stream: stream.to_owned(),
        shard: format!("shardId-{n:012}"),
        sequence_number: format!("4960{n:020}"),
    };
    let mut records = vec![InputRecord {
        position: position(&env.config.impressions_stream, 0),
        data: encode_impression(&imp),
        invalid_base64: None,
        arrival_ms: Some(base),
    }];
    for (n, click) in clicks.iter().enumerate() {
        records.push(InputRecord {
            position: position(&env.config.clicks_stream, n + 1),
            data: encode_click(click),
            invalid_base64: None,
            arrival_ms: Some(base),
        });
    }
    let joiner = BatchJoiner::new(
        DynamoDbJoinState::new(env.clients.dynamodb.clone(), &env.config.state_table),
        MemoryRecordSink::default(),
        MemoryDeadLetterSink::default(),
        env.config.clone(),
    );
    let reports = futures::future::join_all(
        records
            .iter()
            .map(|r| joiner.process(std::slice::from_ref(r), NOW_MS)),
    )
    .await;
    assert!(
        reports.iter().all(|r| r.first_failure.is_none()),
        "no write fails, so no shard is blocked: {:?}",
        reports.iter().find(|r| r.first_failure.is_some())
    );
    // Every click is either joined or dead-lettered, never both, never neither.
    let joined = decode_joined(&joiner.sink.records());
    let letters = joiner.dead_letters.letters();
    assert_eq!(joined.len(), MAX_CLICKS_PER_IMPRESSION);
    assert_eq!(letters.len(), extra);
    for body in letters.values() {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["reason"], "too_many_clicks", "{v}");
    }
    // A redelivery of everything changes nothing: duplicates write nothing, the refused stay
    // refused.
    let again = futures::future::join_all(
        records
            .iter()
            .map(|r| joiner.process(std::slice::from_ref(r), NOW_MS + 1)),
    )
    .await;
    assert!(again.iter().all(|r| r.first_failure.is_none()));
    assert_eq!(decode_joined(&joiner.sink.records()).len(), joined.len());
    assert_eq!(joiner.dead_letters.letters().len(), extra);

    let stored = item(&env, &imp.impression_id).await;
    let size = item_size(&stored);
    eprintln!("largest possible join-state item: {size} bytes");
    assert!(
        size < 400 * 1024,
        "the fullest item is {size} bytes, over DynamoDB's 400 KB"
    );
    assert!(
        size > 200 * 1024,
        "the test did build a large item: {size} bytes"
    );
}
