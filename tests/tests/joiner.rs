//! The joiner function as deployed, against a real AWS-compatible endpoint (moto on loopback):
//! input batches from the `events/` fixtures are routed onto a real keyed stream, what the
//! router put there is read back and handed to the function again as a batch of the keyed
//! stream (as its event source mapping would deliver it), and the keyed role joins it with its
//! state in the DynamoDB log table onto the real joined stream, dead letters in S3.
//!
//! These are the behaviours the retired per-event joiner's tests guarded, on the keyed path:
//! clicks before impressions, malformed and hostile input, concurrency on the endpoint, late
//! partners, the clicks-per-impression cap and partial `PutRecords` failures.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use adpipe_aws::{
    Clients, DynamoDbStateLog, KinesisRecordSink, KinesisShardRanges, S3DeadLetterSink,
};
use adpipe_core::config::JoinerConfig;
use adpipe_core::join::buckets::BucketRange;
use adpipe_core::join::input::BatchReport;
use adpipe_core::join::joiner::KeyedJoiner;
use adpipe_core::join::rule::MAX_CLICKS_PER_IMPRESSION;
use adpipe_core::join::state::{PutSlot, Slot};
use adpipe_core::model::{JoinedStreamRecord, JoinedWire};
use adpipe_core::ports::{
    DeadLetterSink, EntryResult, OutRecord, PortError, RecordSink, ShardRanges, StateLog,
};
use adpipe_it::{
    create_bucket, create_log_table, create_stream, hostile_corpus, load_batch, read_objects,
    read_records, read_stream, unique, LocalAws,
};
use adpipe_joiner::{aws_function, handle_routed, AwsFunction};
use adpipe_lambda::{KinesisBatch, KinesisBatchData, KinesisBatchRecord, KinesisInput};
use aws_lambda_events::event::streams::KinesisEventResponse;
use base64::Engine;

/// 2026-11-20T10:15:40Z: ten seconds after the fixtures' first arrival on the input streams.
const T0: i64 = 1_795_169_740_000;

const ACCOUNT_ARN: &str = "arn:aws:kinesis:us-east-1:123456789012:stream/";

struct Env {
    clients: Clients,
    config: JoinerConfig,
}

/// A keyed stream, a joined stream (one shard each), a log table and a dead-letter bucket of
/// the test's own, and the function's configuration as the template sets it.
async fn env(extra: &[(&str, &str)]) -> Env {
    let clients = LocalAws::shared().clients().await;
    let (keyed, joined) = (unique("keyed"), unique("joined"));
    let (log, bucket) = (unique("state-log"), unique("dlq"));
    create_stream(&clients, &keyed, 1).await.unwrap();
    create_stream(&clients, &joined, 1).await.unwrap();
    create_log_table(&clients, &log).await.unwrap();
    create_bucket(&clients, &bucket).await.unwrap();
    let vars: BTreeMap<String, String> = [
        ("IMPRESSIONS_STREAM_NAME", "adpipe-local-impressions"),
        (
            "CLICKS_STREAM_NAME",
            "arn:aws:kinesis:us-east-1:123456789012:stream/adpipe-local-clicks",
        ),
        ("KEYED_STREAM_NAME", keyed.as_str()),
        ("JOINED_STREAM_NAME", joined.as_str()),
        // Still required by `JoinerConfig::from_lookup` on this branch; nothing reads it.
        ("STATE_LOG_TABLE_NAME", log.as_str()),
        ("DEAD_LETTER_BUCKET", bucket.as_str()),
        ("EMIT_MAX_ATTEMPTS", "2"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let config = JoinerConfig::from_lookup(|k| vars.get(k).cloned()).unwrap();
    Env { clients, config }
}

type Outcome = (KinesisEventResponse, BatchReport);

/// One invocation of the function (either role, as the event's source decides).
async fn invoke(f: &AwsFunction, event: &impl KinesisInput, now_ms: i64) -> Outcome {
    handle_routed(&f.router, &f.keyed, event, now_ms, &Default::default()).await
}

/// Where the keyed stream has been read up to, per shard (exclusive), as the event source
/// mapping's checkpoint would be.
type Cursor = BTreeMap<String, String>;

/// Every record of the keyed stream after `cursor`, one batch per shard, as the keyed
/// stream's event source mapping delivers it: the stream's ARN, `eventID` `shard:sequence`.
/// The records' arrival is stamped `now_ms`, the test's clock (the local stream stamps the
/// wall clock, while the fixtures and the clock of these tests are of 2026-11-20).
async fn keyed_batches(env: &Env, cursor: &Cursor, now_ms: i64) -> Vec<KinesisBatch> {
    let stream = &env.config.keyed_stream;
    let mut after = cursor.clone();
    let mut by_shard: BTreeMap<String, KinesisBatch> = BTreeMap::new();
    loop {
        let page = read_records(&env.clients, stream, &after, 10_000)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        for r in page {
            let p = r.position;
            after.insert(p.shard.clone(), p.sequence_number.clone());
            by_shard
                .entry(p.shard.clone())
                .or_default()
                .records
                .push(KinesisBatchRecord {
                    event_id: Some(format!("{}:{}", p.shard, p.sequence_number)),
                    event_source_arn: Some(format!("{ACCOUNT_ARN}{stream}")),
                    kinesis: KinesisBatchData {
                        sequence_number: p.sequence_number,
                        data: base64::engine::general_purpose::STANDARD.encode(&r.data),
                        approximate_arrival_timestamp: Some(serde_json::json!(
                            now_ms as f64 / 1000.0
                        )),
                    },
                });
        }
    }
    by_shard.into_values().collect()
}

/// Moves the cursor past a batch.
fn advance(cursor: &mut Cursor, batch: &KinesisBatch) {
    for r in &batch.records {
        let shard = r.event_id.as_deref().unwrap().split_once(':').unwrap().0;
        cursor.insert(shard.to_owned(), r.kinesis.sequence_number.clone());
    }
}

/// The round trip of one input batch through the deployed function: routed onto the keyed
/// stream, then what the router put there (after `cursor`) joined, shard by shard. Returns the
/// route's outcome and each keyed batch's; the cursor moves past the keyed batches.
async fn round_trip(
    env: &Env,
    f: &AwsFunction,
    input: &impl KinesisInput,
    cursor: &mut Cursor,
    now_ms: i64,
) -> (Outcome, Vec<Outcome>) {
    let routed = invoke(f, input, now_ms).await;
    let mut joined = Vec::new();
    for batch in keyed_batches(env, cursor, now_ms).await {
        joined.push(invoke(f, &batch, now_ms).await);
        advance(cursor, &batch);
    }
    (routed, joined)
}

fn no_failures(outcomes: &[Outcome]) -> bool {
    outcomes
        .iter()
        .all(|(response, _)| response.batch_item_failures.is_empty())
}

/// Everything the joined stream holds.
async fn joined_stream(env: &Env) -> Vec<JoinedStreamRecord> {
    read_stream(&env.clients, &env.config.joined_stream)
        .await
        .unwrap()
        .iter()
        .flat_map(|d| {
            serde_json::from_slice::<JoinedWire>(d)
                .expect("a joined-stream record")
                .into_records()
        })
        .collect()
}

/// Copies on the joined stream: `(not flagged, flagged recovered)`.
type Copies = BTreeMap<(String, String), (u32, u32)>;

/// The pairs on the joined stream by `(impression_id, click_id)`, and the forwarded
/// impressions by `(impression_id, "")`.
async fn copies(env: &Env) -> (Copies, Copies) {
    let (mut pairs, mut impressions) = (Copies::new(), Copies::new());
    for r in joined_stream(env).await {
        let (map, key, recovered) = match &r {
            JoinedStreamRecord::Click(c) => (
                &mut pairs,
                (c.impression_id.clone(), c.click_id.clone()),
                c.recovered,
            ),
            JoinedStreamRecord::Impression(i) => (
                &mut impressions,
                (i.impression_id.clone(), String::new()),
                i.recovered,
            ),
        };
        let e = map.entry(key).or_default();
        if recovered {
            e.1 += 1
        } else {
            e.0 += 1
        }
    }
    (pairs, impressions)
}

fn pair_keys(c: &Copies) -> Vec<(&str, &str)> {
    c.keys().map(|(i, k)| (i.as_str(), k.as_str())).collect()
}

/// The id `events/clicks.json` derives for its click without `click_id`.
async fn derived_click_id(env: &Env) -> String {
    joined_stream(env)
        .await
        .into_iter()
        .find_map(|r| match r {
            JoinedStreamRecord::Click(c) if c.click_id_derived => Some(c.click_id),
            _ => None,
        })
        .expect("the fixture's id-less click joined")
}

/// The dead letters under `dead-letter/`: `(key, body)`.
async fn dead_letters(env: &Env) -> Vec<(String, serde_json::Value)> {
    read_objects(&env.clients, &env.config.dead_letter_bucket, "dead-letter/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, b)| (k, serde_json::from_slice(&b).unwrap()))
        .collect()
}

fn expected_fixture_pairs(derived: &str) -> Vec<(&str, &str)> {
    let mut v = vec![
        ("imp-1001", "clk-1"),
        ("imp-1001", derived),
        ("imp-1003", "clk-3"),
    ];
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_before_impressions_join_once_each_and_redelivery_emits_nothing_new() {
    let env = env(&[]).await;
    let f = aws_function(&env.clients, env.config.clone());
    let clicks = load_batch("clicks.json");
    let impressions = load_batch("impressions.json");
    let mut cursor = Cursor::new();

    // Every click is routed and joined before its impression: buffered, joined on arrival.
    let (routed, joined) = round_trip(&env, &f, &clicks, &mut cursor, T0).await;
    assert!(routed.0.batch_item_failures.is_empty());
    assert_eq!(routed.1.counts.clicks, 7);
    assert!(!joined.is_empty() && no_failures(&joined), "{joined:?}");
    assert_eq!(joined.iter().map(|o| o.1.counts.joined).sum::<u64>(), 0);
    assert!(copies(&env).await.0.is_empty(), "nothing joined yet");
    let (routed, joined) = round_trip(&env, &f, &impressions, &mut cursor, T0 + 1_000).await;
    assert!(routed.0.batch_item_failures.is_empty());
    assert!(!joined.is_empty() && no_failures(&joined), "{joined:?}");
    assert_eq!(joined.iter().map(|o| o.1.counts.joined).sum::<u64>(), 3);

    let derived = derived_click_id(&env).await;
    let (pairs, forwarded) = copies(&env).await;
    assert_eq!(pair_keys(&pairs), expected_fixture_pairs(&derived));
    assert!(pairs.values().all(|&c| c == (1, 0)), "{pairs:?}");
    let ids: Vec<&str> = forwarded.keys().map(|k| k.0.as_str()).collect();
    assert_eq!(ids, ["imp-1001", "imp-1002", "imp-1003", "imp-1004"]);
    assert!(forwarded.values().all(|&c| c == (1, 0)), "{forwarded:?}");
    let first = joined_stream(&env)
        .await
        .into_iter()
        .find_map(|r| match r {
            JoinedStreamRecord::Click(c) if c.click_id == "clk-3" => Some(c),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        first.impression_time, "2026-11-20T10:15:10.500Z",
        "+02:00 normalised to UTC"
    );

    // Lambda redelivers both input batches, then the whole keyed stream from its start.
    for (event, t) in [(&impressions, T0 + 5_000), (&clicks, T0 + 6_000)] {
        let (response, _) = invoke(&f, event, t).await;
        assert!(response.batch_item_failures.is_empty());
    }
    let redelivered = keyed_batches(&env, &Cursor::new(), T0 + 7_000).await;
    for batch in &redelivered {
        let (response, report) = invoke(&f, batch, T0 + 7_000).await;
        assert!(response.batch_item_failures.is_empty(), "{response:?}");
        assert_eq!(report.counts.joined, 0);
    }
    let (pairs_after, forwarded_after) = copies(&env).await;
    let unflagged = |c: &Copies| -> Vec<((String, String), u32)> {
        c.iter().map(|(k, v)| (k.clone(), v.0)).collect()
    };
    assert_eq!(
        unflagged(&pairs_after),
        unflagged(&pairs),
        "no new unflagged pair"
    );
    assert_eq!(unflagged(&forwarded_after), unflagged(&forwarded));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_dead_lettered_with_reason_and_do_not_block_the_shard() {
    let env = env(&[]).await;
    let f = aws_function(&env.clients, env.config.clone());
    let event = load_batch("malformed.json");
    let mut cursor = Cursor::new();
    let (routed, joined) = round_trip(&env, &f, &event, &mut cursor, T0).await;
    assert!(routed.0.batch_item_failures.is_empty());
    assert_eq!(routed.1.counts.rejected_total(), 11);
    assert_eq!(
        routed.1.counts.impressions, 1,
        "the valid record after the bad ones is processed"
    );
    assert!(no_failures(&joined), "{joined:?}");
    let (_, forwarded) = copies(&env).await;
    assert!(forwarded.contains_key(&("imp-2001".to_owned(), String::new())));

    let letters = dead_letters(&env).await;
    let mut by_position: Vec<&str> = Vec::new();
    for record in &event.records[..11] {
        let seq = &record.kinesis.sequence_number;
        let (key, v) = letters
            .iter()
            .find(|(_, v)| v["sequence_number"] == seq.as_str())
            .expect("every bad record has an entry");
        assert_eq!(v["stream"], "adpipe-local-impressions");
        assert_eq!(v["shard"], "shardId-000000000002");
        assert!(key.ends_with(&format!("/{seq}.json")));
        by_position.push(v["reason"].as_str().unwrap());
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
    assert_eq!(letters.len(), 11);

    // A redelivery rewrites the same entries: still exactly one per bad record.
    let (routed, joined) = round_trip(&env, &f, &event, &mut cursor, T0 + 60_000).await;
    assert!(routed.0.batch_item_failures.is_empty() && no_failures(&joined));
    assert_eq!(dead_letters(&env).await.len(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_corpus_is_dead_lettered_once_each_with_its_reason_and_the_rest_accepted() {
    let env = env(&[]).await;
    let f = aws_function(&env.clients, env.config.clone());
    let corpus = hostile_corpus();
    let mut cursor = Cursor::new();
    let mut accepted = 0;
    for file in ["hostile-impressions.json", "hostile-clicks.json"] {
        let batch = load_batch(file);
        let (routed, joined) = round_trip(&env, &f, &batch, &mut cursor, T0).await;
        assert!(
            routed.0.batch_item_failures.is_empty(),
            "{file}: {:?}",
            routed.0
        );
        assert!(no_failures(&joined), "{file}: {joined:?}");
        accepted += routed.1.counts.impressions + routed.1.counts.clicks;
        // A retry of the whole batch changes nothing.
        let (routed, joined) = round_trip(&env, &f, &batch, &mut cursor, T0 + 1_000).await;
        assert!(routed.0.batch_item_failures.is_empty() && no_failures(&joined));
    }
    let mut letters = Vec::new();
    for (key, v) in dead_letters(&env).await {
        assert!(key.ends_with(&format!("/{}.json", v["sequence_number"].as_str().unwrap())));
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
    assert_eq!(accepted, ok, "every accepted case was routed");
    let (_, forwarded) = copies(&env).await;
    assert!(
        forwarded.contains_key(&("h-ok-1mb-record".to_owned(), String::new())),
        "the largest accepted impression went through the keyed stream and was joined"
    );
}

/// Two execution environments (two `aws_function` values) handed the same keyed batch at
/// once, against one log table: one writes the batch's slot, and each pair reaches the joined
/// stream exactly once unflagged, whatever the other does and however it is redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_environments_racing_on_one_keyed_batch_write_one_slot_and_each_pair_once() {
    let env = env(&[]).await;
    let a = aws_function(&env.clients, env.config.clone());
    let b = aws_function(&env.clients, env.config.clone());
    // Both input batches routed by one environment; the keyed batch then holds every event.
    for event in ["impressions.json", "clicks.json"] {
        let (response, _) = invoke(&a, &load_batch(event), T0).await;
        assert!(response.batch_item_failures.is_empty());
    }
    let batches = keyed_batches(&env, &Cursor::new(), T0 + 1_000).await;
    assert_eq!(batches.len(), 1, "one keyed shard");
    let batch = &batches[0];
    let (ra, rb) = tokio::join!(invoke(&a, batch, T0 + 1_000), invoke(&b, batch, T0 + 1_000));

    // Exactly one slot in the log: the batch was written once.
    let log = DynamoDbStateLog::new(env.clients.dynamodb.clone(), &env.config.state_log_table);
    let slots = log.read(&BucketRange::ALL.log_id(), 0).await.unwrap();
    assert_eq!(slots.len(), 1, "{slots:?}");
    let failed: Vec<&Outcome> = [&ra, &rb]
        .into_iter()
        .filter(|o| !o.0.batch_item_failures.is_empty())
        .collect();
    eprintln!(
        "racing environments: a {:?} joined {}, b {:?} joined {}",
        ra.0.batch_item_failures, ra.1.counts.joined, rb.0.batch_item_failures, rb.1.counts.joined
    );
    assert!(failed.len() <= 1, "at least one environment succeeded");
    let derived = derived_click_id(&env).await;
    let (pairs, forwarded) = copies(&env).await;
    assert_eq!(pair_keys(&pairs), expected_fixture_pairs(&derived));
    assert!(pairs.values().all(|c| c.0 == 1), "{pairs:?}");
    assert!(forwarded.values().all(|c| c.0 == 1), "{forwarded:?}");

    // Lambda redelivers the batch to both environments (a failed one would see it again):
    // nothing new unflagged, nothing fails.
    for f in [&a, &b] {
        let (response, _) = invoke(f, batch, T0 + 2_000).await;
        assert!(response.batch_item_failures.is_empty(), "{response:?}");
    }
    let (pairs_after, forwarded_after) = copies(&env).await;
    assert_eq!(pair_keys(&pairs_after), pair_keys(&pairs));
    assert!(pairs_after.values().all(|c| c.0 == 1), "{pairs_after:?}");
    assert!(
        forwarded_after.values().all(|c| c.0 == 1),
        "{forwarded_after:?}"
    );
    assert_eq!(
        log.read(&BucketRange::ALL.log_id(), 0).await.unwrap().len(),
        1,
        "a redelivery of a batch already in the log writes no slot"
    );
}

/// The fence itself: many writers put the same slot number of one log at once; DynamoDB's
/// conditional `PutItem` lets exactly one through, and its body is the one stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_of_one_slot_number_write_exactly_once() {
    const WRITERS: usize = 24;
    const ROUNDS: u64 = 4;
    let env = env(&[]).await;
    let log = DynamoDbStateLog::new(env.clients.dynamodb.clone(), &env.config.state_log_table);
    let id = BucketRange::ALL.log_id();
    for n in 0..ROUNDS {
        let slots: Vec<Slot> = (0..WRITERS)
            .map(|w| Slot {
                n,
                body: format!("writer {w} of slot {n}").into_bytes(),
                ttl_epoch_s: T0 / 1000 + 86_400,
            })
            .collect();
        let results = futures::future::join_all(slots.iter().map(|s| log.put(&id, s))).await;
        let written: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Ok(PutSlot::Written)))
            .map(|(i, _)| i)
            .collect();
        let taken = results
            .iter()
            .filter(|r| matches!(r, Ok(PutSlot::Taken)))
            .count();
        assert_eq!(written.len(), 1, "slot {n}: {results:?}");
        assert_eq!(taken, WRITERS - 1, "slot {n}: {results:?}");
        let stored = log.read(&id, n).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0], slots[written[0]], "the winner's body is stored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_arriving_after_retention_is_recorded_late_not_joined() {
    let env = env(&[("STATE_RETENTION_SECONDS", "60")]).await;
    let f = aws_function(&env.clients, env.config.clone());
    let mut cursor = Cursor::new();
    let (routed, joined) =
        round_trip(&env, &f, &load_batch("impressions.json"), &mut cursor, T0).await;
    assert!(routed.0.batch_item_failures.is_empty() && no_failures(&joined));
    // The clicks reach their stream 61 s after the fixture says: past the retention.
    let mut clicks = load_batch("clicks.json");
    for r in &mut clicks.records {
        let t = r.kinesis.approximate_arrival_timestamp.as_ref().unwrap();
        let late = t.as_f64().unwrap() + 61.0;
        r.kinesis.approximate_arrival_timestamp = Some(serde_json::json!(late));
    }
    let (routed, joined) = round_trip(&env, &f, &clicks, &mut cursor, T0 + 61_000).await;
    assert!(routed.0.batch_item_failures.is_empty());
    assert!(!joined.is_empty() && no_failures(&joined), "{joined:?}");
    assert_eq!(joined.iter().map(|o| o.1.counts.joined).sum::<u64>(), 0);
    assert_eq!(joined.iter().map(|o| o.1.counts.late).sum::<u64>(), 3);
    assert!(copies(&env).await.0.is_empty(), "no pair joined");

    let late: Vec<(String, serde_json::Value)> =
        read_objects(&env.clients, &env.config.dead_letter_bucket, "late/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, b)| (k, serde_json::from_slice(&b).unwrap()))
            .filter(|(_, v): &(String, serde_json::Value)| v["kind"] == "late")
            .collect();
    assert_eq!(late.len(), 3, "{late:?}");
    let (key, v) = late
        .iter()
        .find(|(k, _)| k.ends_with("/clk-1.json"))
        .unwrap();
    assert_eq!(key, "late/joiner/imp-1001/clk-1.json");
    assert_eq!(v["arrival_gap_ms"], 61_000);
    assert_eq!(v["pair"]["impression_id"], "imp-1001");
}

/// An input batch of the given events, as the impressions or clicks stream delivers it.
fn input_batch(stream: &str, shard: &str, events: &[Vec<u8>], arrival_s: f64) -> KinesisBatch {
    KinesisBatch {
        records: events
            .iter()
            .enumerate()
            .map(|(n, data)| {
                let seq = format!("4960{n:020}");
                KinesisBatchRecord {
                    event_id: Some(format!("{shard}:{seq}")),
                    event_source_arn: Some(format!("{ACCOUNT_ARN}{stream}")),
                    kinesis: KinesisBatchData {
                        sequence_number: seq,
                        data: base64::engine::general_purpose::STANDARD.encode(data),
                        approximate_arrival_timestamp: Some(serde_json::json!(arrival_s)),
                    },
                }
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_beyond_the_cap_on_one_impression_are_dead_lettered_too_many_clicks() {
    use adpipe_core::model::{Click, Impression};
    use adpipe_core::validate::{encode_click, encode_impression};

    let env = env(&[]).await;
    let f = aws_function(&env.clients, env.config.clone());
    let base = 1_795_169_730_000i64;
    let imp = Impression {
        ad_id: "ad-1".into(),
        impression_id: unique("capped"),
        campaign_id: "camp-1".into(),
        publisher_id: "pub-1".into(),
        event_time_ms: base,
        device_type: "mobile".into(),
        geo_location: "US".into(),
        platform: "ios".into(),
        ad_type: "banner".into(),
        bid_price: 1.0,
    };
    let extra = 5;
    let clicks: Vec<Vec<u8>> = (0..MAX_CLICKS_PER_IMPRESSION + extra)
        .map(|c| {
            encode_click(&Click {
                ad_id: imp.ad_id.clone(),
                impression_id: imp.impression_id.clone(),
                campaign_id: imp.campaign_id.clone(),
                publisher_id: imp.publisher_id.clone(),
                event_time_ms: base + c as i64 * 100,
                device_type: "mobile".into(),
                geo_location: "US".into(),
                platform: "ios".into(),
                click_price: 0.5,
                click_id: format!("clk-{c}"),
                click_id_derived: false,
            })
        })
        .collect();
    let arrival_s = (base + 500) as f64 / 1000.0;
    let impressions = input_batch(
        &env.config.impressions_stream,
        "shardId-000000000000",
        &[encode_impression(&imp)],
        arrival_s,
    );
    let clicks = input_batch(
        &env.config.clicks_stream,
        "shardId-000000000001",
        &clicks,
        arrival_s,
    );
    let mut cursor = Cursor::new();
    for batch in [&impressions, &clicks] {
        let (routed, joined) = round_trip(&env, &f, batch, &mut cursor, T0).await;
        assert!(routed.0.batch_item_failures.is_empty() && no_failures(&joined));
    }
    let (pairs, _) = copies(&env).await;
    assert_eq!(pairs.len(), MAX_CLICKS_PER_IMPRESSION);
    assert!(pairs.values().all(|&c| c == (1, 0)), "{pairs:?}");
    let letters = dead_letters(&env).await;
    assert_eq!(letters.len(), extra, "{letters:?}");
    let mut refused = HashSet::new();
    for (_, v) in &letters {
        assert_eq!(v["reason"], "too_many_clicks", "{v}");
        refused.insert(v["sequence_number"].as_str().unwrap().to_owned());
    }
    assert_eq!(refused.len(), extra, "one letter per refused click");

    // A redelivery of everything changes nothing: the refused stay refused, once each.
    let (_, joined) = round_trip(&env, &f, &clicks, &mut cursor, T0 + 1_000).await;
    assert!(no_failures(&joined));
    assert_eq!(copies(&env).await.0, pairs);
    assert_eq!(dead_letters(&env).await.len(), extra);
}

/// The real Kinesis sink, except that entries whose partition key is listed are refused (not
/// forwarded) while `enabled`: a partial `PutRecords` failure.
struct RefuseKeys<K> {
    inner: K,
    keys: HashSet<String>,
    enabled: AtomicBool,
    refused: AtomicU32,
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
        let n = refuse.iter().filter(|f| **f).count() as u32;
        self.refused.fetch_add(n, Ordering::SeqCst);
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

/// A batch of the records from `from` on, as Lambda redelivers after a partial failure.
fn tail(batch: &KinesisBatch, from_sequence: &str) -> KinesisBatch {
    let mut b = batch.clone();
    let start = b
        .records
        .iter()
        .position(|r| r.kinesis.sequence_number == from_sequence)
        .unwrap();
    b.records.drain(..start);
    b
}

async fn join_with<L, R, K, D>(
    keyed: &KeyedJoiner<L, R, K, D>,
    f: &AwsFunction,
    batch: &KinesisBatch,
    now_ms: i64,
) -> Outcome
where
    L: StateLog,
    R: ShardRanges,
    K: RecordSink,
    D: DeadLetterSink,
{
    handle_routed(&f.router, keyed, batch, now_ms, &Default::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_put_records_failure_reports_the_last_record_and_redelivery_completes_flagged() {
    let env = env(&[]).await;
    let f = aws_function(&env.clients, env.config.clone());
    // The function's keyed role, its joined-stream sink refusing imp-1003's pairs.
    let keyed = KeyedJoiner::new(
        DynamoDbStateLog::new(env.clients.dynamodb.clone(), &env.config.state_log_table),
        KinesisShardRanges::new(env.clients.kinesis.clone()),
        RefuseKeys {
            inner: KinesisRecordSink::new(env.clients.kinesis.clone(), &env.config.joined_stream),
            keys: ["imp-1003".to_owned()].into(),
            enabled: AtomicBool::new(true),
            refused: AtomicU32::new(0),
        },
        S3DeadLetterSink::new(env.clients.s3.clone(), &env.config.dead_letter_bucket),
        env.config.clone(),
    );
    for event in ["impressions.json", "clicks.json"] {
        let (response, _) = invoke(&f, &load_batch(event), T0).await;
        assert!(response.batch_item_failures.is_empty());
    }
    let batches = keyed_batches(&env, &Cursor::new(), T0 + 1_000).await;
    assert_eq!(batches.len(), 1, "one keyed shard");
    let batch = &batches[0];

    // clk-3 joins imp-1003, whose entry keeps failing: the batch names its last record.
    let (response, report) = join_with(&keyed, &f, batch, T0 + 1_000).await;
    assert_eq!(response.batch_item_failures.len(), 1, "{response:?}");
    let failed_seq = response.batch_item_failures[0]
        .item_identifier
        .clone()
        .unwrap();
    let last = &batch.records.last().unwrap().kinesis.sequence_number;
    assert_eq!(&failed_seq, last);
    assert_eq!(
        keyed.sink.refused.load(Ordering::SeqCst),
        2,
        "tried EMIT_MAX_ATTEMPTS times within the invocation"
    );
    assert_eq!(report.counts.joined, 2);
    let (pairs, _) = copies(&env).await;
    assert_eq!(pairs.len(), 2);
    assert!(!pairs.contains_key(&("imp-1003".to_owned(), "clk-3".to_owned())));

    // Lambda redelivers from the failed record on; the throttle has passed.
    keyed.sink.enabled.store(false, Ordering::SeqCst);
    let (response, report) = join_with(&keyed, &f, &tail(batch, &failed_seq), T0 + 2_000).await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(report.counts.joined, 1);
    let derived = derived_click_id(&env).await;
    let (pairs, forwarded) = copies(&env).await;
    assert_eq!(
        pair_keys(&pairs),
        expected_fixture_pairs(&derived),
        "none lost"
    );
    for (key, c) in &pairs {
        let want = if key.0 == "imp-1003" { (0, 1) } else { (1, 0) };
        assert_eq!(*c, want, "{key:?}: the re-sent pair is flagged recovered");
    }
    assert!(forwarded.values().all(|c| c.0 == 1), "{forwarded:?}");
}
