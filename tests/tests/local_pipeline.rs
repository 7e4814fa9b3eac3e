//! The local pipeline end to end on the local endpoint: generated or replayed records in the
//! input streams, both functions driven by the event source mapping runner, the lake read back
//! by pyiceberg, and the dead-letter destination, compared with what the input must give.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adpipe_core::model::{Click, Impression};
use adpipe_it::{unique, workspace_root, LocalAws};
use adpipe_local::endpoint::LocalEndpoint;
use adpipe_local::esm::FunctionError;
use adpipe_local::functions::JoinerFunction;
use adpipe_local::generator::{generate, DelayMix, Traffic, TrafficConfig};
use adpipe_local::pipeline::{Functions, Pipeline};
use adpipe_local::progress::Counter;
use adpipe_local::replay::{parse_jsonl, read_jsonl, to_jsonl, write_jsonl, Order};
use adpipe_local::resources::Resources;
use adpipe_local::runner::{Invocation, KinesisFunction, RunOptions, RunReport};
use aws_lambda_events::event::kinesis::KinesisEvent;
use serde_json::Value;

/// A pipeline of its own on the shared endpoint, with small batches and no batching window,
/// so a few hundred records take several invocations and no waiting.
async fn pipeline() -> Pipeline {
    let local = LocalAws::shared();
    let mut resources = Resources::isolated(&unique("lp"));
    resources.joiner_mapping.batch_size = 40;
    resources.joiner_mapping.batching_window = Duration::ZERO;
    resources.joiner_mapping.retry_delay = Duration::ZERO;
    resources.enricher_mapping.batch_size = 250;
    resources.enricher_mapping.batching_window = Duration::ZERO;
    resources.enricher_mapping.retry_delay = Duration::ZERO;
    let p = Pipeline::connect(
        LocalEndpoint::existing(&local.endpoint),
        resources,
        &workspace_root(),
    )
    .await;
    p.provision().await.unwrap();
    p
}

fn counters() -> (Arc<Counter>, Arc<Counter>) {
    (Counter::new("impressions", 0), Counter::new("clicks", 0))
}

async fn send(p: &Pipeline, imps: &[Vec<u8>], clicks: &[Vec<u8>]) {
    p.send(imps, clicks, Order::Interleaved, None, &counters())
        .await
        .unwrap();
}

async fn drain(p: &Pipeline, f: &Functions) -> RunReport {
    let report = p.drain(f).await.unwrap();
    for (name, c) in &report.mappings {
        assert_eq!(c.discarded, 0, "{name} discarded records: {c:?}");
    }
    report
}

fn traffic(seed: u64, prefix: &str) -> Traffic {
    generate(&TrafficConfig {
        seed,
        impressions: 250,
        ctr: 0.35,
        second_click: 0.2,
        delays: DelayMix {
            inside: 0.8,
            before: 0.1,
            beyond: 0.1,
        },
        duration_ms: 4 * 60_000,
        out_of_order: 0.2,
        reorder_distance: 30,
        duplicates: 0.05,
        malformed: 0.03,
        id_prefix: prefix.to_owned(),
        ..TrafficConfig::default()
    })
    .unwrap()
}

/// Every row of both lake tables, read by pyiceberg.
async fn lake_rows(p: &Pipeline) -> (Vec<Value>, Vec<Value>) {
    let scan = p
        .lake()
        .scan(&["enriched_clicks", "impressions"])
        .await
        .unwrap();
    let rows = |t: &str| scan[t]["rows"].as_array().cloned().unwrap_or_default();
    (rows("enriched_clicks"), rows("impressions"))
}

// ---- The reference, written here from the contract (SPEC.md), not taken from the core. ----

fn reference_pairs<'a>(
    imps: &'a [Impression],
    clicks: &'a [Click],
) -> BTreeMap<(String, String), (&'a Impression, &'a Click)> {
    let mut out = BTreeMap::new();
    for c in clicks {
        for i in imps {
            if i.impression_id == c.impression_id
                && i.ad_id == c.ad_id
                && (c.event_time_ms - i.event_time_ms).abs() <= 30_000
            {
                out.insert((i.impression_id.clone(), c.click_id.clone()), (i, c));
            }
        }
    }
    out
}

fn expected_category(device: &str) -> &'static str {
    let d = device.trim().to_ascii_lowercase();
    if ["mobile", "phone", "smartphone", "android", "ios"].contains(&d.as_str()) {
        "Mobile"
    } else if ["tablet", "ipad"].contains(&d.as_str()) {
        "Tablet"
    } else if ["desktop", "pc", "laptop", "mac", "windows", "linux"].contains(&d.as_str()) {
        "Desktop"
    } else {
        "Other"
    }
}

/// pyiceberg's zone-less timestamp (`2026-11-20T10:00:01` or `…:01.250000`) as epoch ms.
fn lake_time_ms(v: &Value) -> i64 {
    let text = v.as_str().unwrap();
    let t = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").unwrap();
    t.and_utc().timestamp_millis()
}

fn s<'a>(row: &'a Value, field: &str) -> &'a str {
    row[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {row}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_traffic_lands_in_the_lake_as_the_reference_join_says() {
    let p = pipeline().await;
    let t = traffic(11, "e2e-");
    assert!(t.stats.clicks_before > 0 && t.stats.clicks_beyond > 0 && t.stats.malformed > 0);
    send(&p, &t.impression_records, &t.click_records).await;
    let f = p.functions().unwrap();
    let report = drain(&p, &f).await;
    assert!(
        report
            .counts(&format!(
                "{} <- {}",
                p.resources.joiner.name, p.resources.impressions_stream.name
            ))
            .invocations
            > 2,
        "several batches per shard: {report:?}"
    );

    let (clicks, imps) = lake_rows(&p).await;
    let expected = reference_pairs(&t.impressions, &t.clicks);
    assert!(expected.len() > 20, "a meaningful number of pairs");
    let mut seen = BTreeSet::new();
    for row in &clicks {
        let key = (
            s(row, "impression_id").to_owned(),
            s(row, "click_id").to_owned(),
        );
        assert!(seen.insert(key.clone()), "pair {key:?} twice in the lake");
        let (imp, click) = expected
            .get(&key)
            .unwrap_or_else(|| panic!("pair {key:?} is not in the reference join"));
        assert_eq!(s(row, "ad_id"), imp.ad_id);
        assert_eq!(s(row, "campaign_id"), imp.campaign_id);
        assert_eq!(s(row, "device_type"), imp.device_type);
        assert_eq!(lake_time_ms(&row["impression_time"]), imp.event_time_ms);
        assert_eq!(lake_time_ms(&row["click_time"]), click.event_time_ms);
        let premium = if imp.bid_price > 50.0 { "Yes" } else { "No" };
        assert_eq!(s(row, "is_premium_ad"), premium, "bid {}", imp.bid_price);
        // Whole seconds, truncated toward zero (Rust's integer division does exactly that).
        let engagement = (click.event_time_ms - imp.event_time_ms) / 1000;
        assert_eq!(row["engagement_duration"].as_i64(), Some(engagement));
        assert_eq!(
            s(row, "platform_category"),
            expected_category(&imp.device_type)
        );
        let revenue = row["click_revenue"].as_f64().unwrap();
        assert!(
            (revenue - click.click_price * 1.2).abs() < 1e-9,
            "{revenue}"
        );
        assert_eq!(row["bid_price"].as_f64(), Some(imp.bid_price));
        assert_eq!(row["click_price"].as_f64(), Some(click.click_price));
    }
    assert_eq!(
        seen.len(),
        expected.len(),
        "every reference pair is in the lake"
    );
    // Both is_premium_ad values and engagements on both sides of zero are covered.
    let values =
        |f: &str| -> BTreeSet<String> { clicks.iter().map(|r| r[f].to_string()).collect() };
    assert_eq!(values("is_premium_ad").len(), 2);
    assert!(
        clicks
            .iter()
            .any(|r| lake_time_ms(&r["click_time"]) < lake_time_ms(&r["impression_time"])),
        "clicks slightly before their impression joined too"
    );

    // Impressions: each generated impression exactly once, duplicates and all.
    let mut ids: Vec<&str> = imps.iter().map(|r| s(r, "impression_id")).collect();
    ids.sort_unstable();
    let mut want: Vec<&str> = t
        .impressions
        .iter()
        .map(|i| i.impression_id.as_str())
        .collect();
    want.sort_unstable();
    assert_eq!(ids, want);

    // Every malformed record is in the dead-letter destination, once.
    let letters = p.dead_letter_objects("dead-letter/joiner/").await.unwrap();
    assert_eq!(letters.len() as u64, t.stats.malformed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_records_replayed_clicks_first_give_the_same_lake() {
    let t = traffic(23, "order-");
    // Through JSONL files, as `adpipe-local replay` reads them.
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
    let good = r#"{"ad_id":"ad-1","impression_id":"mal-imp-1","campaign_id":"c","publisher_id":"p","event_time":"2026-11-20T10:00:00Z","device_type":"ios","geo_location":"US","platform":"ios","ad_type":"banner","bid_price":1.5}"#;
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
    let imps = report.counts(&format!(
        "{} <- {}",
        p.resources.joiner.name, p.resources.impressions_stream.name
    ));
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
    let imps = report.counts(&format!(
        "{} <- {}",
        p.resources.joiner.name, p.resources.impressions_stream.name
    ));
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
}
