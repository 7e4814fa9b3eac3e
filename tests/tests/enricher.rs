//! The enricher against a real AWS-compatible endpoint (moto on loopback): S3, the Glue Data
//! Catalog and the DynamoDB commit lease, driven by `events/joined.json`.

use std::collections::BTreeMap;

use adpipe_aws::Clients;
use adpipe_core::config::EnricherConfig;
use adpipe_core::ports::LakeTable;
use adpipe_enricher::{aws_enricher, handle, lake_config, AwsEnricher};
use adpipe_it::{create_bucket, create_state_table, load_event, read_objects, unique, LocalAws};
use arrow_array::{Array, RecordBatch};
use futures::TryStreamExt;
use iceberg::Catalog;

const NOW_MS: i64 = 1_795_219_200_000;

struct Env {
    clients: Clients,
    config: EnricherConfig,
    endpoint: String,
}

async fn env() -> Env {
    let local = LocalAws::shared();
    let clients = local.clients().await;
    let (bucket, lease, db) = (
        unique("lake"),
        unique("lease"),
        unique("db").replace('-', "_"),
    );
    create_bucket(&clients, &bucket).await.unwrap();
    create_state_table(&clients, &lease).await.unwrap();
    let vars: BTreeMap<&str, String> = [
        ("JOINED_STREAM_NAME", "adpipe-joined".to_owned()),
        ("LAKE_BUCKET", bucket.clone()),
        ("GLUE_DATABASE", db),
        ("COMMIT_LEASE_TABLE", lease),
        ("DEAD_LETTER_BUCKET", bucket),
    ]
    .into();
    let config = EnricherConfig::from_lookup(|k| vars.get(k).cloned()).unwrap();
    Env {
        clients,
        config,
        endpoint: local.endpoint.clone(),
    }
}

async fn enricher(env: &Env, owner: &str) -> AwsEnricher {
    let mut lake = lake_config(
        &env.config,
        Some(env.endpoint.clone()),
        Some("us-east-1".into()),
    );
    lake.credentials = Some(("test".into(), "test".into()));
    aws_enricher(&env.clients, env.config.clone(), lake, owner.into())
        .await
        .unwrap()
}

/// Every row of a lake table, read back through iceberg-rust.
async fn rows(enricher: &AwsEnricher, table: LakeTable) -> Vec<RecordBatch> {
    let t = enricher
        .lake
        .catalog()
        .load_table(&enricher.lake.ident(table))
        .await
        .unwrap();
    if t.metadata().current_snapshot().is_none() {
        return Vec::new();
    }
    t.scan()
        .select_all()
        .build()
        .unwrap()
        .to_arrow()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

fn column(batches: &[RecordBatch], name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        let c = b.column_by_name(name).unwrap();
        let s = arrow_array::cast::as_string_array(c.as_ref());
        out.extend((0..s.len()).map(|i| s.value(i).to_owned()));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_batch_lands_once_in_both_tables() {
    let env = env().await;
    let e = enricher(&env, "test-writer").await;
    let event = load_event("joined.json");
    let (response, report) = handle(&e, "adpipe", &event, NOW_MS).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        report.failed
    );
    assert_eq!(report.clicks.rows_written, 2);
    assert_eq!(report.impressions.rows_written, 7);
    assert_eq!(report.counts.rejected_total(), 1);
    assert_eq!(
        report.counts.duplicates, 1,
        "the recovered repeat of clk-1 in the same batch"
    );

    let clicks = rows(&e, LakeTable::Clicks).await;
    assert_eq!(column(&clicks, "click_id"), ["clk-1", "clk-3"]);
    let imps = rows(&e, LakeTable::Impressions).await;
    assert_eq!(column(&imps, "impression_id").len(), 7);

    // A retry of the same batch finds its range in the snapshot history and adds nothing.
    let (response, report) = handle(&e, "adpipe", &event, NOW_MS + 1_000).await;
    assert!(response.batch_item_failures.is_empty());
    assert!(report.clicks.already_committed && report.impressions.already_committed);
    assert_eq!(
        column(&rows(&e, LakeTable::Clicks).await, "click_id").len(),
        2
    );
    assert_eq!(
        column(&rows(&e, LakeTable::Impressions).await, "impression_id").len(),
        7
    );

    // Every object stays under the table locations, whatever the campaign ids.
    let objects = read_objects(&env.clients, &env.config.lake_bucket, "")
        .await
        .unwrap();
    for (key, _) in &objects {
        assert!(
            key.starts_with("lake/") || key.starts_with("dead-letter/enricher/"),
            "{key}"
        );
        assert!(
            !key.contains("/../") && !key.contains("campaign_id=a/"),
            "{key}"
        );
    }
    println!("{:#?}", objects.iter().map(|(k, _)| k).collect::<Vec<_>>());
}
