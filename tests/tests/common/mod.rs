//! What the local-pipeline tests share: a pipeline of their own, seeded traffic, and the check
//! of the lake against a reference join computed here from the contract.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use adpipe_core::model::{Click, Impression};
use adpipe_it::{unique, workspace_root, LocalAws};
use adpipe_local::endpoint::LocalEndpoint;
use adpipe_local::generator::{generate, DelayMix, Traffic, TrafficConfig};
use adpipe_local::pipeline::{Functions, Pipeline};
use adpipe_local::progress::Counter;
use adpipe_local::replay::Order;
use adpipe_local::resources::Resources;
use adpipe_local::runner::{MappingCounts, RunReport};
use serde_json::Value;

/// A pipeline of its own on the shared endpoint, with small batches and no batching window,
/// so a few hundred records take several invocations and no waiting.
pub async fn pipeline() -> Pipeline {
    pipeline_on(&LocalAws::shared().endpoint).await
}

/// The same, with every AWS request (the functions', the runner's) sent to `endpoint`.
pub async fn pipeline_on(endpoint: &str) -> Pipeline {
    let mut resources = Resources::isolated(&unique("lp"));
    resources.joiner_mapping.batch_size = 40;
    resources.joiner_mapping.batching_window = Duration::ZERO;
    resources.joiner_mapping.retry_delay = Duration::ZERO;
    resources.enricher_mapping.batch_size = 250;
    resources.enricher_mapping.batching_window = Duration::ZERO;
    resources.enricher_mapping.retry_delay = Duration::ZERO;
    let p = Pipeline::connect(
        LocalEndpoint::existing(endpoint),
        resources,
        &workspace_root(),
    )
    .await;
    p.provision().await.unwrap();
    p
}

pub fn counters() -> (Arc<Counter>, Arc<Counter>) {
    (Counter::new("impressions", 0), Counter::new("clicks", 0))
}

pub async fn send(p: &Pipeline, imps: &[Vec<u8>], clicks: &[Vec<u8>]) {
    p.send(imps, clicks, Order::Interleaved, None, &counters())
        .await
        .unwrap();
}

pub async fn drain(p: &Pipeline, f: &Functions) -> RunReport {
    let report = p.drain(f).await.unwrap();
    for (name, c) in &report.mappings {
        assert_eq!(c.discarded, 0, "{name} discarded records: {c:?}");
    }
    report
}

pub fn traffic(seed: u64, prefix: &str) -> Traffic {
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
        start_ms: adpipe_it::recent_start_ms(4 * 60_000),
        out_of_order: 0.2,
        reorder_distance: 30,
        duplicates: 0.05,
        malformed: 0.03,
        id_prefix: prefix.to_owned(),
        ..TrafficConfig::default()
    })
    .unwrap()
}

/// What the joiner's mapping on the impressions stream did in a run.
pub fn impressions_mapping(p: &Pipeline, report: &RunReport) -> MappingCounts {
    report.counts(&format!(
        "{} <- {}",
        p.resources.joiner.name, p.resources.impressions_stream.name
    ))
}

/// Every row of both lake tables, read by pyiceberg.
pub async fn lake_rows(p: &Pipeline) -> (Vec<Value>, Vec<Value>) {
    let scan = p
        .lake()
        .scan(&["enriched_clicks", "impressions"])
        .await
        .unwrap();
    let rows = |t: &str| scan[t]["rows"].as_array().cloned().unwrap_or_default();
    (rows("enriched_clicks"), rows("impressions"))
}

// ---- The reference, written here from the contract (docs/DESIGN.md), not taken from the core. ----

pub fn reference_pairs<'a>(
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

pub fn expected_category(device: &str) -> &'static str {
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
pub fn lake_time_ms(v: &Value) -> i64 {
    let text = v.as_str().unwrap();
    let t = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").unwrap();
    t.and_utc().timestamp_millis()
}

pub fn s<'a>(row: &'a Value, field: &str) -> &'a str {
    row[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {row}"))
}

/// The lake and the dead letters against the reference join of the traffic: every pair once
/// with its enrichment values, every impression once, every malformed record dead-lettered once.
pub async fn check_lake(p: &Pipeline, t: &Traffic) {
    check_lake_with(p, t, 0).await
}

/// [`check_lake`] when `extra` more records than the traffic's malformed ones were sent to be
/// dead-lettered.
pub async fn check_lake_with(p: &Pipeline, t: &Traffic, extra: u64) {
    let (clicks, imps) = lake_rows(p).await;
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
    assert_eq!(letters.len() as u64, t.stats.malformed + extra);
}
