//! The local pipeline end to end on the local endpoint: generated or replayed records in the
//! input streams, both functions driven by the event source mapping runner, the lake read back
//! by pyiceberg, and the dead-letter destination, compared with what the input must give.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use adpipe_it::unique;
use adpipe_local::esm::FunctionError;
use adpipe_local::functions::JoinerFunction;
use adpipe_local::replay::{parse_jsonl, read_jsonl, to_jsonl, write_jsonl};
use adpipe_local::runner::{Invocation, KinesisFunction, RunOptions};
use aws_lambda_events::event::kinesis::KinesisEvent;
use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_traffic_lands_in_the_lake_as_the_reference_join_says() {
    let p = pipeline().await;
    let t = traffic(11, "e2e-");
    assert!(t.stats.clicks_before > 0 && t.stats.clicks_beyond > 0 && t.stats.malformed > 0);
    send(&p, &t.impression_records, &t.click_records).await;
    let f = p.functions().unwrap();
    let report = drain(&p, &f).await;
    assert!(
        impressions_mapping(&p, &report).invocations > 2,
        "several batches per shard: {report:?}"
    );

    check_lake(&p, &t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_records_replayed_clicks_first_give_the_same_lake() {
    let t = traffic(23, "order-");
    // Through JSONL files, as `adpipe replay` reads them.
    let dir = std::env::temp_dir().join(unique("adpipe-replay"));
    write_jsonl(&dir.join("impressions.jsonl"), &t.impression_records).unwrap();
    write_jsonl(&dir.join("clicks.jsonl"), &t.click_records).unwrap();
    let imps = read_jsonl(&dir.join("impressions.jsonl")).unwrap();
    let clicks = read_jsonl(&dir.join("clicks.jsonl")).unwrap();
    assert_eq!((&imps, &clicks), (&t.impression_records, &t.click_records));

    let interleaved = pipeline().await;
    send(&interleaved, &imps, &clicks).await;
    let fa = interleaved.functions().unwrap();
    drain(&interleaved, &fa).await;

    // Clicks first: every click is processed before the first impression is even sent.
    let clicks_first = pipeline().await;
    let fb = clicks_first.functions().unwrap();
    send(&clicks_first, &[], &clicks).await;
    drain(&clicks_first, &fb).await;
    let after_clicks = fb.joiner.totals();
    assert_eq!(after_clicks.joined, 0);
    assert!(
        after_clicks.buffered as usize >= t.clicks.len(),
        "{after_clicks:?}"
    );
    send(&clicks_first, &imps, &[]).await;
    drain(&clicks_first, &fb).await;
    assert!(fb.joiner.totals().joined > 0);

    let normalise = |rows: Vec<Value>| -> Vec<Value> {
        let mut rows: Vec<Value> = rows
            .into_iter()
            .map(|mut r| {
                // When a row was processed is the one field that may differ.
                r.as_object_mut().unwrap().remove("processed_time");
                r
            })
            .collect();
        rows.sort_by_key(|r| r.to_string());
        rows
    };
    let (ca, ia) = lake_rows(&interleaved).await;
    let (cb, ib) = lake_rows(&clicks_first).await;
    assert!(!ca.is_empty() && ia.len() == t.impressions.len());
    assert_eq!(normalise(ca), normalise(cb), "enriched_clicks differ");
    assert_eq!(normalise(ia), normalise(ib), "impressions differ");
    std::fs::remove_dir_all(&dir).ok();
}

/// The joiner, but the first invocation crashes after the handler did its work (a timeout
/// after the writes): Lambda then retries records whose dead letters were already written.
struct CrashOnce {
    inner: Arc<JoinerFunction>,
    crashed: AtomicBool,
}

impl KinesisFunction for CrashOnce {
    fn arn(&self) -> String {
        self.inner.arn()
    }

    fn invoke(self: Arc<Self>, event: KinesisEvent) -> Invocation {
        Box::pin(async move {
            let response = self.inner.clone().invoke(event).await?;
            if !self.crashed.swap(true, Ordering::SeqCst) {
                return Err(FunctionError::Crashed(
                    "injected: crash after the batch".into(),
                ));
            }
            Ok(response)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_malformed_lines_are_dead_lettered_once_each_with_their_reason() {
    let p = pipeline().await;
    // A recent event time: the joiner refuses events older than its deduplication horizon.
    let good = format!(
        r#"{{"ad_id":"ad-1","impression_id":"mal-imp-1","campaign_id":"c","publisher_id":"p","event_time":"{}","device_type":"ios","geo_location":"US","platform":"ios","ad_type":"banner","bid_price":1.5}}"#,
        adpipe_core::time::format_millis(adpipe_lambda::now_ms() - 3_600_000)
    );
    let good = good.as_str();
    let with = |field: &str, value: &str| {
        let mut v: serde_json::Map<String, Value> = serde_json::from_str(good).unwrap();
        if value == "<absent>" {
            v.remove(field);
        } else {
            v.insert(field.into(), serde_json::from_str(value).unwrap());
        }
        serde_json::to_vec(&v).unwrap()
    };
    let lines: Vec<(Vec<u8>, Option<&str>)> = vec![
        (b"this is not json".to_vec(), Some("invalid_json")),
        (good.as_bytes().to_vec(), None),
        (b"\xff\xfe{\"a\":1}".to_vec(), Some("invalid_utf8")),
        (b"[1,2,3]".to_vec(), Some("not_an_object")),
        (with("campaign_id", "<absent>"), Some("missing_field")),
        (with("ad_id", "null"), Some("null_field")),
        (with("bid_price", "\"12.5\""), Some("wrong_type")),
        (with("impression_id", "\"\""), Some("empty_id")),
        (with("device_type", "\"\""), Some("empty_field")),
        (with("bid_price", "-1"), Some("negative_price")),
        (
            with("event_time", "\"2026-02-30T10:00:00Z\""),
            Some("invalid_time"),
        ),
        (
            br#"{"ad_id":"ad-1","impression_id":"trunc"#.to_vec(),
            Some("invalid_json"),
        ),
        (Vec::new(), Some("invalid_json")),
    ];
    let file = to_jsonl(&lines.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>()).unwrap();
    let records = parse_jsonl(&file);
    assert_eq!(
        records.len(),
        lines.len(),
        "one record per line, the empty one too"
    );
    send(&p, &records, &[]).await;

    let f = p.functions().unwrap();
    let mut stages = p.mappings(&f).await.unwrap();
    // One batch for the whole shard, so the crash makes Lambda redo every record.
    stages[0][0].settings.batch_size = 100;
    stages[0][0].function = Arc::new(CrashOnce {
        inner: f.joiner.clone(),
        crashed: AtomicBool::new(false),
    });
    let report = p
        .run(&f, stages, RunOptions::drain(&p.resources.region))
        .await
        .unwrap();
    let imps = impressions_mapping(&p, &report);
    assert_eq!(imps.function_errors, 1, "{imps:?}");
    assert_eq!(imps.discarded, 0);
    assert!(
        imps.records_delivered > lines.len() as u64,
        "the crashed batch was redelivered"
    );

    let letters = p.dead_letter_objects("dead-letter/joiner/").await.unwrap();
    let expected: Vec<(&[u8], &str)> = lines
        .iter()
        .filter_map(|(l, r)| r.map(|r| (l.as_slice(), r)))
        .collect();
    assert_eq!(
        letters.len(),
        expected.len(),
        "one entry per malformed line, no more"
    );
    let mut got: Vec<(Vec<u8>, String)> = letters
        .iter()
        .map(|(key, v)| {
            assert!(key.ends_with(&format!("/{}.json", v["sequence_number"].as_str().unwrap())));
            assert_eq!(v["stream"], p.resources.impressions_stream.name.as_str());
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(v["data_base64"].as_str().unwrap())
                .unwrap();
            (raw, v["reason"].as_str().unwrap().to_owned())
        })
        .collect();
    got.sort();
    let mut want: Vec<(Vec<u8>, String)> = expected
        .iter()
        .map(|(l, r)| (l.to_vec(), (*r).to_owned()))
        .collect();
    want.sort();
    assert_eq!(got, want, "each line's bytes with its reason");
    // The valid line after the bad ones went through.
    let (_, imps_rows) = lake_rows(&p).await;
    assert_eq!(imps_rows.len(), 1);
    assert_eq!(imps_rows[0]["impression_id"], "mal-imp-1");

    // `adpipe status` on this stage: the same dead letters, an empty on-failure queue, and the
    // commit that landed the one valid impression.
    let status = adpipe_local::status::local(&p).await.unwrap();
    assert_eq!(status.dead_letters_listed, expected.len(), "{status:?}");
    assert_eq!(status.dead_letters_last_hour, expected.len());
    assert_eq!(status.on_failure_messages, 0);
    let (_, commits) = status
        .commits
        .iter()
        .find(|(table, _)| table.ends_with(".impressions"))
        .expect("the impressions table");
    let commits = commits.as_ref().unwrap();
    assert_eq!(
        commits
            .iter()
            .map(|c| c.added_records.unwrap_or(0))
            .sum::<u64>(),
        1,
        "{commits:?}"
    );
    assert!(adpipe_local::status::render(&status).contains("not in CloudWatch here"));
}

/// A function that always fails: every batch is a function error.
struct AlwaysFails;

impl KinesisFunction for AlwaysFails {
    fn arn(&self) -> String {
        "arn:aws:lambda:us-east-1:123456789012:function:always-fails".into()
    }
    fn invoke(self: Arc<Self>, _event: KinesisEvent) -> Invocation {
        Box::pin(async { Err(FunctionError::Unhandled("always fails".into())) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_out_of_retries_go_to_the_on_failure_queue_and_free_the_shard() {
    let p = pipeline().await;
    let lines: Vec<Vec<u8>> = (0..5)
        .map(|i| format!(r#"{{"impression_id":"of-{i}"}}"#).into_bytes())
        .collect();
    send(&p, &lines, &[]).await;
    let f = p.functions().unwrap();
    let mut stages = p.mappings(&f).await.unwrap();
    stages.truncate(1);
    for m in &mut stages[0] {
        m.function = Arc::new(AlwaysFails);
        m.settings.max_retry_attempts = Some(1);
        m.settings.bisect_on_error = false;
    }
    let report = p
        .run(&f, stages, RunOptions::drain(&p.resources.region))
        .await
        .unwrap();
    let imps = impressions_mapping(&p, &report);
    assert_eq!(imps.discarded, 5, "{imps:?}");
    let records = p.on_failure_records().await.unwrap();
    let discarded: u64 = records
        .iter()
        .map(|r| {
            assert_eq!(r["requestContext"]["condition"], "RetryAttemptsExhausted");
            let info = &r["KinesisBatchInfo"];
            assert!(info["streamArn"]
                .as_str()
                .unwrap()
                .ends_with(&format!(":stream/{}", p.resources.impressions_stream.name)));
            info["batchSize"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(
        discarded, 5,
        "every discarded record is described once: {records:?}"
    );

    // Redrive: the pointers lead back to the records, which the real joiner then processes.
    let done = p.redrive().await.unwrap();
    assert_eq!((done.records, done.batches), (5, records.len() as u64));
    assert!(
        p.on_failure_records().await.unwrap().is_empty(),
        "handled messages are deleted"
    );
    let f = p.functions().unwrap();
    let mut stages = p.mappings(&f).await.unwrap();
    stages.truncate(1);
    let report = p
        .run(&f, stages, RunOptions::drain(&p.resources.region))
        .await
        .unwrap();
    let imps = impressions_mapping(&p, &report);
    // From the stream's start: the five originals and their five redriven copies (these
    // records lack fields, so the joiner dead-letters each; what matters is that it got them).
    assert_eq!((imps.records_done, imps.discarded), (10, 0), "{imps:?}");
    assert_eq!(f.joiner.totals().rejected_total(), 10);
}

/// Records packed by the reference implementation of the KPL aggregation format (Python's
/// aws-kinesis-agg, not adpipe's own), plain and aggregated mixed on both input streams, plus
/// three aggregates spoilt three ways: the lake is exactly what the same records sent plain
/// give, each malformed user record is dead-lettered on its own at its sub-sequence number, and
/// each spoilt aggregate once, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kpl_aggregates_of_the_reference_library_land_like_plain_records() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let t = traffic(31, "kpl-");
    let encode =
        |records: &[Vec<u8>]| -> Vec<String> { records.iter().map(|r| b64.encode(r)).collect() };
    // Valid impressions of ids nobody else sends: spoilt, they must reach only the dead letters.
    let spoilt: Vec<String> = (0..3)
        .map(|n| {
            let mut v: Value = serde_json::from_slice(&t.impression_records[0]).unwrap();
            v["impression_id"] = format!("kpl-spoilt-{n}").into();
            b64.encode(serde_json::to_vec(&v).unwrap())
        })
        .collect();
    let job = serde_json::json!({
        "seed": 31,
        "max_group": 12,
        "streams": {"impressions": encode(&t.impression_records), "clicks": encode(&t.click_records)},
        "corrupt": {"impressions": spoilt},
    });
    let packed = kpl_aggregate(&job);
    let stream = |name: &str| -> Vec<Vec<u8>> {
        packed["streams"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| b64.decode(r.as_str().unwrap()).unwrap())
            .collect()
    };
    let (imps, clicks) = (stream("impressions"), stream("clicks"));
    let count = |k: &str| packed[k].as_u64().unwrap();
    let counts = ["aggregates", "user_records", "plain"].map(count);
    assert!(counts[0] > 20 && counts[2] > 0, "{counts:?}");
    assert_eq!(count("corrupt"), 3);
    assert_eq!(
        count("user_records") + count("plain"),
        (t.impression_records.len() + t.click_records.len()) as u64
    );

    let p = pipeline().await;
    send(&p, &imps, &clicks).await;
    let f = p.functions().unwrap();
    drain(&p, &f).await;
    let totals = f.joiner.totals();
    assert_eq!(totals.user_records, count("user_records"), "{totals:?}");
    check_lake_with(&p, &t, 3).await;

    let letters = p.dead_letter_objects("dead-letter/joiner/").await.unwrap();
    let whole: Vec<&Value> = letters
        .iter()
        .map(|(_, v)| v)
        .filter(|v| v["reason"] == "invalid_aggregate")
        .collect();
    assert_eq!(whole.len(), 3, "each spoilt aggregate once");
    let details: Vec<&str> = whole
        .iter()
        .map(|v| v["detail"].as_str().unwrap())
        .collect();
    for why in ["MD5", "does not decode", "partition key index"] {
        assert!(
            details.iter().any(|d| d.contains(why)),
            "{why}: {details:?}"
        );
    }
    let inside: Vec<&String> = letters
        .iter()
        .filter(|(_, v)| v.get("sub_sequence_number").is_some())
        .map(|(k, _)| k)
        .collect();
    assert!(!inside.is_empty(), "malformed user records of aggregates");
    for key in inside {
        let stem = key.trim_end_matches(".json");
        assert!(
            stem.rsplit_once('.').is_some(),
            "{key} names its sub-sequence number"
        );
    }
    eprintln!(
        "kpl: {} aggregates holding {} user records, {} plain records, {} spoilt aggregates; \
         {} pairs joined",
        count("aggregates"),
        count("user_records"),
        count("plain"),
        count("corrupt"),
        totals.joined
    );
}

/// `tools/kpl_aggregate.py` (the project venv's Python) on a job, its JSON answer.
fn kpl_aggregate(job: &Value) -> Value {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let root = adpipe_it::workspace_root();
    let mut child = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tools/kpl_aggregate.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tools/kpl_aggregate.py (run scripts/venv.sh first)");
    // A script that fails early closes its input: its error, below, says why.
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(job.to_string().as_bytes());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kpl_aggregate.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
