//! The named Athena queries (`sql/*.sql`, the same files template.yaml embeds) run with DuckDB
//! against a local lake built by the real enricher from `events/joined.json`, and return the
//! numbers worked out by hand for that fixed dataset.

use std::collections::BTreeMap;

use adpipe_core::config::EnricherConfig;
use adpipe_enricher::{aws_enricher, handle, lake_config};
use adpipe_it::{create_bucket, lake_check, load_event, unique, workspace_root, LocalAws};
use adpipe_local::provision::create_ttl_table;
use serde_json::{json, Value};

fn close(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() < 1e-9,
        _ => a == b,
    }
}

fn assert_rows(result: &Value, expected: Value) {
    let rows = result["rows"].as_array().unwrap();
    let expected = expected.as_array().unwrap();
    assert_eq!(rows.len(), expected.len(), "{result}");
    for (got, want) in rows.iter().zip(expected) {
        let (g, w) = (got.as_array().unwrap(), want.as_array().unwrap());
        assert!(
            g.len() == w.len() && g.iter().zip(w).all(|(a, b)| close(a, b)),
            "got {got}, want {want}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_queries_return_the_expected_numbers_on_the_local_lake() {
    let local = LocalAws::shared();
    let clients = local.clients().await;
    let (bucket, lease, db) = (
        unique("qlake"),
        unique("qlease"),
        unique("qdb").replace('-', "_"),
    );
    create_bucket(&clients, &bucket).await.unwrap();
    create_ttl_table(&clients, &lease, false).await.unwrap();
    let vars: BTreeMap<&str, String> = [
        ("JOINED_STREAM_NAME", "adpipe-local-joined".to_owned()),
        ("LAKE_BUCKET", bucket.clone()),
        ("GLUE_DATABASE", db.clone()),
        ("COMMIT_LEASE_TABLE", lease),
        ("DEAD_LETTER_BUCKET", bucket),
    ]
    .into();
    let config = EnricherConfig::from_lookup(|k| vars.get(k).cloned()).unwrap();
    let mut lake = lake_config(
        &config,
        Some(local.endpoint.clone()),
        Some("us-east-1".into()),
    );
    lake.credentials = Some(("test".into(), "test".into()));
    let enricher = aws_enricher(&clients, config, lake, "queries".into())
        .await
        .unwrap();
    let (response, _) = handle(
        &enricher,
        "adpipe",
        &load_event("joined.json"),
        1_795_219_200_000,
    )
    .await;
    assert!(response.batch_item_failures.is_empty());

    let sql = workspace_root().join("sql");
    let out = lake_check(
        &local.endpoint,
        &[
            "query",
            "--database",
            &db,
            "--sql-dir",
            sql.to_str().unwrap(),
        ],
    )
    .unwrap();
    let names: Vec<&str> = out
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        names,
        [
            "cost_revenue_per_campaign.sql",
            "ctr_per_campaign_per_minute.sql",
            "engagement_by_device_per_minute.sql",
            "first_click_per_impression.sql"
        ]
    );

    // Campaign ids sort bytewise: "%2F" < "../x" < "a/b" < "camp-1" < "camp-2" < "kampagne-ü".
    assert_rows(
        &out["ctr_per_campaign_per_minute.sql"],
        json!([
            ["%2F", "2026-11-20T10:16:00", 1, 0, 0.0],
            ["../x", "2026-11-20T10:15:00", 1, 0, 0.0],
            ["a/b", "2026-11-20T10:16:00", 1, 0, 0.0],
            ["camp-1", "2026-11-20T10:15:00", 2, 1, 0.5],
            ["camp-2", "2026-11-20T10:15:00", 1, 1, 1.0],
            ["kampagne-ü", "2026-11-20T23:59:00", 1, 0, 0.0]
        ]),
    );
    assert_rows(
        &out["engagement_by_device_per_minute.sql"],
        json!([
            ["Desktop", "2026-11-20T10:15:00", 1, 1],
            ["Desktop", "2026-11-20T10:16:00", 1, 0],
            ["Mobile", "2026-11-20T10:15:00", 1, 1],
            ["Mobile", "2026-11-20T23:59:00", 1, 0],
            ["Other", "2026-11-20T10:15:00", 1, 0],
            ["Tablet", "2026-11-20T10:15:00", 1, 0],
            ["Tablet", "2026-11-20T10:16:00", 1, 0]
        ]),
    );
    assert_rows(
        &out["cost_revenue_per_campaign.sql"],
        json!([
            ["%2F", 1, 0, 5.0, 0.0, 0.0],
            ["../x", 1, 0, 80.0, 0.0, 0.0],
            ["a/b", 1, 0, 51.0, 0.0, 0.0],
            ["camp-1", 2, 1, 112.5, 0.5, 0.6],
            ["camp-2", 1, 1, 12.75, 1.0, 1.2],
            ["kampagne-ü", 1, 0, 0.0, 0.0, 0.0]
        ]),
    );
    let first = &out["first_click_per_impression.sql"]["rows"];
    let pairs: Vec<(&str, &str)> = first
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap(), r[1].as_str().unwrap()))
        .collect();
    assert_eq!(pairs, [("imp-1001", "clk-1"), ("imp-1003", "clk-3")]);
}
