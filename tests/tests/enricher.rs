//! The enricher against a real AWS-compatible endpoint (moto on loopback): S3, the Glue Data
//! Catalog and the DynamoDB commit lease, driven by `events/joined.json`.

use std::collections::BTreeMap;
use std::sync::Arc;

use adpipe_aws::Clients;
use adpipe_aws::S3DeadLetterSink;
use adpipe_core::config::EnricherConfig;
use adpipe_core::enricher::{BatchEnricher, EnricherSettings};
use adpipe_core::ports::{AppendReport, LakeAppend, LakeTable, PortError, TableWriter};
use adpipe_enricher::{aws_enricher, handle, lake_config, AwsEnricher};
use adpipe_it::{create_bucket, create_lease_table, load_event, read_objects, unique, LocalAws};
use adpipe_lake::{iceberg_schema, DynamoDbCommitLease, IcebergLake};
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
    create_lease_table(&clients, &lease).await.unwrap();
    let vars: BTreeMap<&str, String> = [
        ("JOINED_STREAM_NAME", "adpipe-local-joined".to_owned()),
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

/// The enricher's lake settings against the local endpoint, with its static credentials.
fn local_lake_config(env: &Env) -> adpipe_lake::LakeConfig {
    let mut config = lake_config(
        &env.config,
        Some(env.endpoint.clone()),
        Some("us-east-1".into()),
    );
    config.credentials = Some(("test".into(), "test".into()));
    config
}

async fn enricher(env: &Env, owner: &str) -> AwsEnricher {
    let lake = local_lake_config(env);
    aws_enricher(&env.clients, env.config.clone(), lake, owner.into())
        .await
        .unwrap()
}

/// The lake of `env`, as a writer named `owner` (another version of the enricher, a test).
async fn lake_of(env: &Env, owner: &str) -> IcebergLake {
    let config = local_lake_config(env);
    let lease =
        DynamoDbCommitLease::new(env.clients.dynamodb.clone(), &env.config.commit_lease_table);
    IcebergLake::connect(config, lease, owner.into())
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

/// A copy of `event` keeping records `range` (Lambda's bisect-on-error re-splits a batch).
fn slice(
    event: &aws_lambda_events::event::kinesis::KinesisEvent,
    range: std::ops::Range<usize>,
) -> aws_lambda_events::event::kinesis::KinesisEvent {
    let mut e = event.clone();
    e.records = e.records[range].to_vec();
    e
}

fn snapshots(t: &iceberg::table::Table) -> usize {
    t.metadata().snapshots().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bisected_retry_of_a_committed_batch_adds_nothing() {
    let env = env().await;
    let e = enricher(&env, "test-writer").await;
    let event = load_event("joined.json");
    handle(&e, "adpipe", &event, NOW_MS).await;
    // The commit landed but Lambda did not hear of it (timeout): bisect retries the halves.
    for half in [slice(&event, 0..5), slice(&event, 5..8)] {
        let (response, report) = handle(&e, "adpipe", &half, NOW_MS + 5_000).await;
        assert!(response.batch_item_failures.is_empty());
        assert!(
            !report.clicks.already_committed,
            "a new range, overlapping the committed one"
        );
        assert_eq!(
            report.clicks.rows_written + report.impressions.rows_written,
            0
        );
    }
    assert_eq!(
        column(&rows(&e, LakeTable::Clicks).await, "click_id"),
        ["clk-1", "clk-3"]
    );
    assert_eq!(
        column(&rows(&e, LakeTable::Impressions).await, "impression_id").len(),
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_record_in_a_later_batch_lands_only_if_absent() {
    let env = env().await;
    let e = enricher(&env, "test-writer").await;
    let event = load_event("joined.json");
    handle(&e, "adpipe", &slice(&event, 0..5), NOW_MS).await;
    // Later on the shard: a recovered repeat of clk-1 (dropped) and a first copy of the pack
    // of imp-1004 to imp-1007.
    let mut later = slice(&event, 5..7);
    for (n, r) in later.records.iter_mut().enumerate() {
        r.kinesis.sequence_number =
            format!("59656853465235457112345678901234567890123456789{n:03}");
    }
    let (response, report) = handle(&e, "adpipe", &later, NOW_MS + 1_000).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        report.failed
    );
    assert_eq!(report.clicks.duplicates_dropped, 1);
    assert_eq!(report.impressions.rows_written, 4);
    assert_eq!(
        column(&rows(&e, LakeTable::Clicks).await, "click_id"),
        ["clk-1", "clk-3"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_enrichers_committing_at_once_both_land_once() {
    let env = env().await;
    let (a, b) = (
        enricher(&env, "writer-a").await,
        enricher(&env, "writer-b").await,
    );
    let event = load_event("joined.json");
    // Two shards' batches: the same joined records under different shards and impression ids.
    let mut other = event.clone();
    for r in &mut other.records {
        let id = r
            .event_id
            .clone()
            .unwrap_or_default()
            .replace("shardId-000000000003", "shardId-000000000004");
        r.event_id = Some(id);
        let text = String::from_utf8(r.kinesis.data.0.clone())
            .unwrap()
            .replace("imp-", "imp-b");
        r.kinesis.data.0 = text.into_bytes();
    }
    let ((ra, _), (rb, _)) = tokio::join!(
        handle(&a, "adpipe", &event, NOW_MS),
        handle(&b, "adpipe", &other, NOW_MS)
    );
    assert!(ra.batch_item_failures.is_empty() && rb.batch_item_failures.is_empty());
    let clicks = rows(&a, LakeTable::Clicks).await;
    assert_eq!(
        column(&clicks, "click_id"),
        ["clk-1", "clk-1", "clk-3", "clk-3"]
    );
    assert_eq!(
        column(&rows(&a, LakeTable::Impressions).await, "impression_id").len(),
        14
    );
    let t = a
        .lake
        .catalog()
        .load_table(&a.lake.ident(LakeTable::Clicks))
        .await
        .unwrap();
    assert_eq!(snapshots(&t), 2, "one append per writer, neither lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_files_carry_field_ids_iceberg_types_and_the_enriched_values() {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::basic::{Compression, LogicalType, TimeUnit};

    let env = env().await;
    let e = enricher(&env, "test-writer").await;
    handle(&e, "adpipe", &load_event("joined.json"), NOW_MS).await;
    let objects = read_objects(&env.clients, &env.config.lake_bucket, "lake/")
        .await
        .unwrap();
    let (_, body) = objects
        .iter()
        .find(|(k, _)| k.contains("/enriched_clicks/data/impression_hour="))
        .expect("a clicks data file");
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(body.clone())).unwrap();
    let meta = reader.metadata().clone();
    let schema = meta.file_metadata().schema_descr();
    for (i, col) in schema.root_schema().get_fields().iter().enumerate() {
        assert_eq!(
            col.get_basic_info().id(),
            i as i32 + 1,
            "field id of {}",
            col.name()
        );
    }
    let rg = meta.row_group(0);
    for c in rg.columns() {
        assert!(
            matches!(c.compression(), Compression::ZSTD(_)),
            "{:?}",
            c.compression()
        );
    }
    let ts = schema.column(6);
    assert_eq!(ts.name(), "impression_time");
    assert_eq!(ts.physical_type(), parquet::basic::Type::INT64);
    assert_eq!(
        ts.logical_type_ref(),
        Some(&LogicalType::Timestamp {
            is_adjusted_to_u_t_c: false,
            unit: TimeUnit::MICROS
        })
    );
    let batch = reader.build().unwrap().next().unwrap().unwrap();
    // The day's clicks in one file, in the tables' sort order: camp-1's clk-1, then camp-2's
    // clk-3 (the row looked at below).
    assert_eq!(batch.num_rows(), 2);
    let campaigns =
        arrow_array::cast::as_string_array(batch.column_by_name("campaign_id").unwrap());
    assert_eq!(
        (campaigns.value(0), campaigns.value(1)),
        ("camp-1", "camp-2")
    );
    const ROW: usize = 1;
    let get = |name: &str| batch.column_by_name(name).unwrap().clone();
    let s = |name: &str| {
        arrow_array::cast::as_string_array(get(name).as_ref())
            .value(ROW)
            .to_owned()
    };
    assert_eq!(s("click_id"), "clk-3");
    assert_eq!(s("is_premium_ad"), "No", "bid 12.75");
    assert_eq!(s("platform_category"), "Desktop", "' desktop ' trimmed");
    let n = get("engagement_duration");
    assert_eq!(
        arrow_array::cast::as_primitive_array::<arrow_array::types::Int64Type>(n.as_ref())
            .value(ROW),
        -2
    );
    let r = get("click_revenue");
    let revenue =
        arrow_array::cast::as_primitive_array::<arrow_array::types::Float64Type>(r.as_ref())
            .value(ROW);
    assert!((revenue - 1.2).abs() < 1e-12);
    let t = get("impression_time");
    let micros = arrow_array::cast::as_primitive_array::<
        arrow_array::types::TimestampMicrosecondType,
    >(t.as_ref())
    .value(ROW);
    assert_eq!(
        micros, 1_795_169_710_500_000,
        "2026-11-20T10:15:10.500Z in microseconds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyiceberg_and_duckdb_read_exactly_the_rows_written() {
    let env = env().await;
    let e = enricher(&env, "test-writer").await;
    let event = load_event("joined.json");
    handle(&e, "adpipe", &event, NOW_MS).await;
    handle(&e, "adpipe", &event, NOW_MS + 1_000).await; // a retry changes nothing

    let db = env.config.database.clone();
    let scan = adpipe_it::lake_check(
        &env.endpoint,
        &[
            "scan",
            "--database",
            &db,
            "--table",
            "enriched_clicks",
            "--table",
            "impressions",
        ],
    )
    .unwrap();
    let clicks = &scan["enriched_clicks"];
    assert_eq!(clicks["format_version"], 2);
    let names: Vec<&str> = clicks["schema"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 24);
    assert_eq!(
        clicks["schema"][6]["type"], "timestamp",
        "zone-less, as Athena needs"
    );
    assert_eq!(clicks["schema"][0]["id"], 1);
    assert_eq!(clicks["partition_spec"][0]["name"], "impression_hour");
    assert_eq!(clicks["partition_spec"][0]["transform"], "hour");
    assert_eq!(clicks["partition_spec"].as_array().unwrap().len(), 1);
    assert_eq!(clicks["snapshots"].as_array().unwrap().len(), 1);
    assert_eq!(
        clicks["snapshots"][0]["adpipe.input.shard"],
        "shardId-000000000003"
    );
    let mut rows: Vec<&serde_json::Value> = clicks["rows"].as_array().unwrap().iter().collect();
    rows.sort_by_key(|r| r["click_id"].as_str().unwrap().to_owned());
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["click_id"], "clk-1");
    assert_eq!(rows[0]["is_premium_ad"], "Yes");
    assert_eq!(rows[0]["engagement_duration"], 12);
    assert_eq!(rows[0]["platform_category"], "Mobile");
    assert_eq!(rows[0]["impression_time"], "2026-11-20T10:15:00");
    assert_eq!(rows[1]["engagement_duration"], -2);

    let imps = &scan["impressions"];
    let mut ids: Vec<&str> = imps["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["impression_id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        ["imp-1001", "imp-1002", "imp-1003", "imp-1004", "imp-1005", "imp-1006", "imp-1007"]
    );
    let campaigns: std::collections::BTreeSet<&str> = imps["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["campaign_id"].as_str().unwrap())
        .collect();
    assert!(campaigns.contains("../x") && campaigns.contains("a/b") && campaigns.contains("%2F"));

    // DuckDB reads the same tables through their Glue metadata locations.
    let dir = std::env::temp_dir().join(format!("adpipe-sql-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sql = dir.join("counts.sql");
    std::fs::write(
        &sql,
        "SELECT (SELECT count(*) FROM enriched_clicks) AS clicks, (SELECT count(*) FROM impressions) AS impressions",
    )
    .unwrap();
    let q = adpipe_it::lake_check(
        &env.endpoint,
        &["query", "--database", &db, "--file", sql.to_str().unwrap()],
    )
    .unwrap();
    assert_eq!(q["counts.sql"]["rows"][0], serde_json::json!([2, 7]));
}

/// Joined records with event times out of bounds are dead-lettered once each with their reason,
/// and ids whose percent-encoding is far past S3's 1,024-byte key limit land, under bounded
/// keys; the rest of the batch lands with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_bounds_times_are_dead_lettered_and_long_ids_land_under_bounded_keys() {
    let env = env().await;
    let e = enricher(&env, "test-writer").await;
    let mut event = load_event("joined.json");
    let json = |r: &aws_lambda_events::event::kinesis::KinesisEventRecord| -> serde_json::Value {
        serde_json::from_slice(&r.kinesis.data.0).unwrap_or_default()
    };
    let of_type = |t: &str| {
        event
            .records
            .iter()
            .find(|r| json(r)["type"] == t && json(r)["recovered"] == false)
            .cloned()
            .unwrap()
    };
    let (click, impression) = (of_type("click"), of_type("impression"));
    let long_campaign = "\u{1D11E}".repeat(256);
    let long_id = "é".repeat(256);
    let mut with = |template: &aws_lambda_events::event::kinesis::KinesisEventRecord,
                    fields: serde_json::Value| {
        let mut v = json(template);
        for (k, value) in fields.as_object().unwrap() {
            v[k] = value.clone();
        }
        let mut r = template.clone();
        let n = event.records.len();
        r.kinesis.data.0 = serde_json::to_vec(&v).unwrap();
        r.kinesis.sequence_number =
            format!("49656853465235457112345678901234567890123456789{n:03}");
        event.records.push(r);
    };
    with(
        &click,
        serde_json::json!({"impression_id": long_id, "click_id": long_id, "campaign_id": long_campaign}),
    );
    with(
        &impression,
        serde_json::json!({"impression_id": long_id, "campaign_id": long_campaign}),
    );
    with(
        &click,
        serde_json::json!({"click_id": "clk-1999", "impression_time": "2019-06-01T00:00:00Z",
                           "click_time": "2019-06-01T00:00:10Z"}),
    );
    with(
        &impression,
        // Two hours ahead of its arrival (the fixture's joined records arrive from 00:00:30Z).
        serde_json::json!({"impression_id": "imp-ahead", "impression_time": "2026-11-21T02:30:00Z"}),
    );

    let (response, report) = handle(&e, "adpipe", &event, NOW_MS).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        report.failed
    );
    let letters = read_objects(
        &env.clients,
        &env.config.lake_bucket,
        "dead-letter/enricher/",
    )
    .await
    .unwrap();
    let mut reasons: Vec<String> = letters
        .iter()
        .map(|(_, body)| {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            v["reason"].as_str().unwrap().to_owned()
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "event_time_in_future",
            "event_time_too_early",
            "invalid_json"
        ],
        "the two out-of-bounds records and the fixture's malformed one, once each"
    );
    let clicks = rows(&e, LakeTable::Clicks).await;
    assert_eq!(
        column(&clicks, "click_id"),
        ["clk-1", "clk-3", long_id.as_str()]
    );
    let imps = column(&rows(&e, LakeTable::Impressions).await, "impression_id");
    assert_eq!(imps.len(), 8, "the fixture's seven and the long one");
    assert!(imps.contains(&long_id));
    let objects = read_objects(&env.clients, &env.config.lake_bucket, "")
        .await
        .unwrap();
    let longest = objects.iter().map(|(k, _)| k.len()).max().unwrap();
    assert!(longest <= 1024, "longest key {longest} bytes");
}

/// The stack was deleted with the bucket kept: the Glue database and its tables are gone, the
/// table files are not. The next enricher's start-up registers each table again from its
/// current metadata instead of creating an empty one over the old location: every row is still
/// there, the snapshot history that makes retries idempotent too, and new batches land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_lake_is_registered_again_not_recreated_when_its_database_is_gone() {
    let env = env().await;
    let e = enricher(&env, "test-writer").await;
    let event = load_event("joined.json");
    let (response, _) = handle(&e, "adpipe", &slice(&event, 0..5), NOW_MS).await;
    assert!(response.batch_item_failures.is_empty());
    let before = (
        column(&rows(&e, LakeTable::Clicks).await, "click_id"),
        column(&rows(&e, LakeTable::Impressions).await, "impression_id"),
    );
    assert!(!before.0.is_empty() && !before.1.is_empty());

    // `aws glue delete-database`: the tables' catalog entries go with it, the files stay.
    let catalog = e.lake.catalog();
    for table in [LakeTable::Clicks, LakeTable::Impressions] {
        catalog.drop_table(&e.lake.ident(table)).await.unwrap();
    }
    let namespace = iceberg::NamespaceIdent::new(env.config.database.clone());
    catalog.drop_namespace(&namespace).await.unwrap();
    assert!(!catalog.namespace_exists(&namespace).await.unwrap());

    // A new execution environment starts on the retained bucket.
    let e = enricher(&env, "test-writer-2").await;
    let after = (
        column(&rows(&e, LakeTable::Clicks).await, "click_id"),
        column(&rows(&e, LakeTable::Impressions).await, "impression_id"),
    );
    assert_eq!(after, before, "every landed row is back");
    // A retry of the landed batch is recognised from the retained history; the rest lands.
    let (response, report) = handle(&e, "adpipe", &slice(&event, 0..5), NOW_MS + 1_000).await;
    assert!(response.batch_item_failures.is_empty());
    assert!(report.clicks.already_committed || report.clicks.rows_written == 0);
    let (response, _) = handle(&e, "adpipe", &slice(&event, 5..8), NOW_MS + 2_000).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        column(&rows(&e, LakeTable::Clicks).await, "click_id"),
        ["clk-1", "clk-3"]
    );
    assert_eq!(
        column(&rows(&e, LakeTable::Impressions).await, "impression_id").len(),
        7
    );

    // Two metadata files of the newest version (a failed commit beside the committed one)
    // cannot be told apart from the files alone: start-up refuses rather than guess.
    let current = catalog
        .load_table(&e.lake.ident(LakeTable::Clicks))
        .await
        .unwrap()
        .metadata_location()
        .unwrap()
        .to_owned();
    let key = current
        .strip_prefix(&format!("s3://{}/", env.config.lake_bucket))
        .unwrap();
    let (dir, file) = key.rsplit_once('/').unwrap();
    let version = file.split_once('-').unwrap().0;
    env.clients
        .s3
        .copy_object()
        .bucket(&env.config.lake_bucket)
        .copy_source(format!("{}/{key}", env.config.lake_bucket))
        .key(format!(
            "{dir}/{version}-00000000-0000-0000-0000-000000000000.metadata.json"
        ))
        .send()
        .await
        .unwrap();
    for table in [LakeTable::Clicks, LakeTable::Impressions] {
        catalog.drop_table(&e.lake.ident(table)).await.unwrap();
    }
    catalog.drop_namespace(&namespace).await.unwrap();
    let mut lake = lake_config(
        &env.config,
        Some(env.endpoint.clone()),
        Some("us-east-1".into()),
    );
    lake.credentials = Some(("test".into(), "test".into()));
    let refused = aws_enricher(&env.clients, env.config.clone(), lake, "writer-3".into()).await;
    let message = format!("{:?}", refused.err().expect("start-up refuses"));
    assert!(message.contains("metadata files of version"), "{message}");
}

/// The lake as an enricher of the previous version wrote it: each append's rows with only the
/// columns that version had (the first ones of the code's schema).
struct PreviousVersion {
    lake: IcebergLake,
    clicks_columns: usize,
    impressions_columns: usize,
}

impl TableWriter for PreviousVersion {
    async fn append(&self, mut append: LakeAppend) -> Result<AppendReport, PortError> {
        let keep = match append.table {
            LakeTable::Clicks => self.clicks_columns,
            LakeTable::Impressions => self.impressions_columns,
        };
        append.rows = append.rows.project(&(0..keep).collect::<Vec<_>>()).unwrap();
        self.lake.append(append).await
    }
}

/// The code's schema of `table` without its last `drop` columns.
fn previous_schema(table: LakeTable, drop: usize) -> Arc<iceberg::spec::Schema> {
    let now = iceberg_schema(table).unwrap();
    let fields = now.as_struct().fields();
    Arc::new(
        iceberg::spec::Schema::builder()
            .with_fields(fields[..fields.len() - drop].iter().cloned())
            .build()
            .unwrap(),
    )
}

/// Tables created by the previous version (clicks without their last two columns, impressions
/// without their last one) and holding its rows: the new enricher's start-up adds the columns
/// before its first write, its rows land with them, and the old rows read them as null.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_of_the_previous_schema_get_the_new_columns_and_keep_their_rows() {
    let env = env().await;
    let old_lake = lake_of(&env, "previous-version").await;
    let (old_clicks, old_imps) = (
        previous_schema(LakeTable::Clicks, 2),
        previous_schema(LakeTable::Impressions, 1),
    );
    old_lake
        .ensure_tables_with(
            &env.clients.s3,
            &[
                (LakeTable::Clicks, old_clicks.clone()),
                (LakeTable::Impressions, old_imps.clone()),
            ],
        )
        .await
        .unwrap();
    let old = BatchEnricher::new(
        PreviousVersion {
            lake: old_lake,
            clicks_columns: old_clicks.as_struct().fields().len(),
            impressions_columns: old_imps.as_struct().fields().len(),
        },
        S3DeadLetterSink::new(env.clients.s3.clone(), &env.config.dead_letter_bucket),
        EnricherSettings {
            rules: env.config.rules,
            dead_letter_prefix: env.config.dead_letter_prefix.clone(),
            max_in_flight: 4,
            time_bounds: env.config.time_bounds,
            max_days_per_batch: env.config.max_days_per_batch,
        },
    );
    let event = load_event("joined.json");
    let (response, report) = handle(&old, "adpipe", &slice(&event, 0..2), NOW_MS).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        report.failed
    );

    // The new version starts: ensure_tables adds the columns, then a batch lands.
    let e = enricher(&env, "new-version").await;
    for (table, old_schema) in [
        (LakeTable::Clicks, &old_clicks),
        (LakeTable::Impressions, &old_imps),
    ] {
        let t = e
            .lake
            .catalog()
            .load_table(&e.lake.ident(table))
            .await
            .unwrap();
        let schema = t.metadata().current_schema();
        let code = iceberg_schema(table).unwrap();
        assert_eq!(
            schema.as_struct().fields().len(),
            code.as_struct().fields().len()
        );
        for (have, want) in schema
            .as_struct()
            .fields()
            .iter()
            .zip(code.as_struct().fields())
        {
            assert_eq!(
                (&have.name, have.id, &have.field_type, have.required),
                (&want.name, want.id, &want.field_type, want.required)
            );
        }
        assert_eq!(t.metadata().schemas_iter().count(), 2, "one schema update");
        assert_ne!(schema.schema_id(), old_schema.schema_id());
    }
    let (response, report) = handle(&e, "adpipe", &slice(&event, 2..8), NOW_MS + 1_000).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        report.failed
    );
    // A second start finds nothing to add.
    for table in [LakeTable::Clicks, LakeTable::Impressions] {
        assert!(e
            .lake
            .migrate_table(table, &iceberg_schema(table).unwrap())
            .await
            .unwrap()
            .is_empty());
    }

    // Every row reads back; only the old version's rows lack the new columns.
    let clicks = rows(&e, LakeTable::Clicks).await;
    assert_eq!(column(&clicks, "click_id"), ["clk-1", "clk-3"]);
    let imps = rows(&e, LakeTable::Impressions).await;
    assert_eq!(column(&imps, "impression_id").len(), 7);
    for (batches, key, old_keys, new_columns) in [
        (
            &clicks,
            "click_id",
            "clk-1",
            &["click_revenue", "processed_time"][..],
        ),
        (&imps, "impression_id", "imp-1001", &["processed_time"][..]),
    ] {
        let (mut old_rows, mut new_rows) = (0, 0);
        for b in batches.iter() {
            let keys = arrow_array::cast::as_string_array(b.column_by_name(key).unwrap());
            for row in 0..b.num_rows() {
                let from_old = keys.value(row) == old_keys;
                for name in new_columns {
                    let c = b.column_by_name(name).unwrap();
                    assert_eq!(c.is_null(row), from_old, "{name} of {}", keys.value(row));
                }
                if from_old {
                    old_rows += 1;
                } else {
                    new_rows += 1;
                }
            }
        }
        assert_eq!(old_rows, 1, "{key}");
        assert!(new_rows > 0, "{key}");
    }
}

/// A table whose schema differs from the code's other than by appended optional columns stops
/// the enricher's start-up, with the column named, and is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retyped_column_stops_start_up_and_changes_nothing() {
    let env = env().await;
    let other = lake_of(&env, "other-version").await;
    let code = iceberg_schema(LakeTable::Clicks).unwrap();
    let retyped: Vec<_> = code
        .as_struct()
        .fields()
        .iter()
        .map(|f| {
            let mut f = f.as_ref().clone();
            if f.name == "engagement_duration" {
                *f.field_type =
                    iceberg::spec::Type::Primitive(iceberg::spec::PrimitiveType::String);
            }
            Arc::new(f)
        })
        .collect();
    let retyped = Arc::new(
        iceberg::spec::Schema::builder()
            .with_fields(retyped)
            .build()
            .unwrap(),
    );
    other
        .ensure_tables_with(
            &env.clients.s3,
            &[
                (LakeTable::Clicks, retyped.clone()),
                (
                    LakeTable::Impressions,
                    iceberg_schema(LakeTable::Impressions).unwrap(),
                ),
            ],
        )
        .await
        .unwrap();
    let mut config = lake_config(
        &env.config,
        Some(env.endpoint.clone()),
        Some("us-east-1".into()),
    );
    config.credentials = Some(("test".into(), "test".into()));
    let refused = aws_enricher(&env.clients, env.config.clone(), config, "new".into()).await;
    let message = format!("{:?}", refused.err().expect("start-up refuses"));
    assert!(
        message.contains("engagement_duration") && message.contains("type"),
        "{message}"
    );
    let t = other
        .catalog()
        .load_table(&other.ident(LakeTable::Clicks))
        .await
        .unwrap();
    assert_eq!(t.metadata().schemas_iter().count(), 1, "nothing applied");
    assert_eq!(
        t.metadata()
            .current_schema()
            .field_by_name("engagement_duration")
            .unwrap()
            .field_type
            .to_string(),
        "string"
    );
}

/// The stack's `Custom::IcebergTables` resource, driven as CloudFormation drives it: a request
/// whose `ResponseURL` is a pre-signed S3 PUT (here on the local endpoint), one reply there.
mod custom_resource {
    use super::*;
    use adpipe_core::config::TablesConfig;
    use adpipe_tables::{handle, send_response, Request, SCHEMA_VERSION};
    use aws_sdk_s3::presigning::PresigningConfig;
    use serde_json::{json, Value};
    use std::time::Duration;

    fn tables_config(env: &Env) -> TablesConfig {
        let c = &env.config;
        let vars: BTreeMap<&str, String> = [
            ("LAKE_BUCKET", c.lake_bucket.clone()),
            ("GLUE_DATABASE", c.database.clone()),
            ("COMMIT_LEASE_TABLE", c.commit_lease_table.clone()),
        ]
        .into();
        TablesConfig::from_lookup(|k| vars.get(k).cloned()).unwrap()
    }

    /// Sends one request through the function's code path and returns the reply CloudFormation
    /// would read from the pre-signed URL.
    async fn request(env: &Env, kind: &str, properties: Value) -> Value {
        let key = format!("cfn-replies/{}", unique(kind));
        let url = env
            .clients
            .s3
            .put_object()
            .bucket(&env.config.lake_bucket)
            .key(&key)
            .presigned(PresigningConfig::expires_in(Duration::from_secs(600)).unwrap())
            .await
            .unwrap()
            .uri()
            .to_owned();
        let mut body = json!({
            "RequestType": kind,
            "ServiceToken": "arn:aws:lambda:us-east-1:123456789012:function:adpipe-dev-tables",
            "RequestId": unique("req"),
            "ResponseURL": url,
            "StackId": "arn:aws:cloudformation:us-east-1:123456789012:stack/adpipe-dev/1",
            "ResourceType": "Custom::IcebergTables",
            "LogicalResourceId": "IcebergTables",
            "ResourceProperties": properties,
        });
        if kind != "Create" {
            body["PhysicalResourceId"] = json!(format!(
                "{}/enriched_clicks,impressions",
                env.config.database
            ));
        }
        if kind == "Update" {
            body["OldResourceProperties"] = json!({"SchemaVersion": "0"});
        }
        let request: Request = serde_json::from_value(body).unwrap();
        let endpoint = env.endpoint.clone();
        let reply = handle(
            &request,
            Ok(tables_config(env)),
            &env.clients,
            |c| {
                let mut lake =
                    adpipe_tables::lake_config(c, Some(endpoint), Some("us-east-1".into()));
                lake.credentials = Some(("test".into(), "test".into()));
                lake
            },
            Duration::from_secs(120),
        )
        .await;
        send_response(&reqwest::Client::new(), &url, &reply)
            .await
            .unwrap();
        let stored = read_objects(&env.clients, &env.config.lake_bucket, &key)
            .await
            .unwrap();
        assert_eq!(stored.len(), 1, "exactly one reply");
        serde_json::from_slice(&stored[0].1).unwrap()
    }

    fn properties(env: &Env) -> Value {
        json!({
            "Database": env.config.database,
            "Warehouse": env.config.warehouse(),
            "SchemaVersion": SCHEMA_VERSION,
        })
    }

    async fn lake(env: &Env) -> IcebergLake {
        lake_of(env, "test").await
    }

    async fn assert_current(lake: &IcebergLake, table: LakeTable) -> iceberg::table::Table {
        let t = lake.catalog().load_table(&lake.ident(table)).await.unwrap();
        let have: Vec<_> = t
            .metadata()
            .current_schema()
            .as_struct()
            .fields()
            .iter()
            .map(|f| (f.name.clone(), f.field_type.clone()))
            .collect();
        let want: Vec<_> = iceberg_schema(table)
            .unwrap()
            .as_struct()
            .fields()
            .iter()
            .map(|f| (f.name.clone(), f.field_type.clone()))
            .collect();
        assert_eq!(have, want, "{table:?} has this version's columns");
        t
    }

    /// Create makes both tables with their partition spec and properties, so queries work
    /// before any traffic; Delete leaves them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_makes_both_tables_before_any_traffic_and_delete_keeps_them() {
        let env = env().await;
        let reply = request(&env, "Create", properties(&env)).await;
        assert_eq!(reply["Status"], "SUCCESS", "{reply}");
        assert_eq!(
            reply["PhysicalResourceId"],
            format!("{}/enriched_clicks,impressions", env.config.database)
        );
        assert_eq!(reply["Data"]["ClicksTableSetup"], "created");
        assert_eq!(reply["Data"]["ImpressionsTableSetup"], "created");
        assert_eq!(reply["Data"]["SchemaVersion"], SCHEMA_VERSION);
        let lake = lake(&env).await;
        for table in [LakeTable::Clicks, LakeTable::Impressions] {
            let t = assert_current(&lake, table).await;
            let spec: Vec<String> = t
                .metadata()
                .default_partition_spec()
                .fields()
                .iter()
                .map(|f| format!("{}:{}", f.name, f.transform))
                .collect();
            assert_eq!(spec, ["impression_hour:hour"]);
            // As deploy/resources.json states the tables.
            let contract: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(adpipe_it::workspace_root().join("deploy/resources.json"))
                    .unwrap(),
            )
            .unwrap();
            let name = lake.ident(table).name().to_owned();
            let stated = &contract["tables"][&name];
            let stated_spec: Vec<String> = stated["partition_spec"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    format!(
                        "{}:{}",
                        f["name"].as_str().unwrap(),
                        f["transform"].as_str().unwrap()
                    )
                })
                .collect();
            assert_eq!(spec, stated_spec, "{name}");
            let order: Vec<String> = t
                .metadata()
                .default_sort_order()
                .fields
                .iter()
                .map(|f| {
                    t.metadata()
                        .current_schema()
                        .name_by_field_id(f.source_id)
                        .unwrap()
                        .to_owned()
                })
                .collect();
            assert_eq!(order, ["campaign_id", "impression_time"]);
            assert_eq!(stated["sort_order"], serde_json::json!(order), "{name}");
            assert_eq!(
                t.metadata()
                    .properties()
                    .get("write.parquet.compression-codec")
                    .map(String::as_str),
                Some("zstd")
            );
            assert!(t.metadata().current_snapshot().is_none(), "no rows yet");
        }

        // A repeated create (CloudFormation retries) changes nothing.
        let again = request(&env, "Create", properties(&env)).await;
        assert_eq!(again["Status"], "SUCCESS");
        assert_eq!(
            again["Data"]["ClicksTableSetup"],
            "exists, schema up to date"
        );

        let deleted = request(&env, "Delete", properties(&env)).await;
        assert_eq!(deleted["Status"], "SUCCESS");
        for table in [LakeTable::Clicks, LakeTable::Impressions] {
            assert!(lake
                .catalog()
                .table_exists(&lake.ident(table))
                .await
                .unwrap());
        }

        // A template naming another database than the function's is refused.
        let mut wrong = properties(&env);
        wrong["Database"] = json!("someone_else");
        let refused = request(&env, "Update", wrong).await;
        assert_eq!(refused["Status"], "FAILED");
        assert!(
            refused["Reason"].as_str().unwrap().contains("someone_else"),
            "{refused}"
        );
    }

    /// Update brings tables of the previous version to this one (the enricher's migration);
    /// a retyped column fails the update, with the column named, and changes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn update_migrates_the_previous_schema_and_refuses_a_retyped_column() {
        let env = env().await;
        let old = lake(&env).await;
        old.ensure_tables_with(
            &env.clients.s3,
            &[
                (LakeTable::Clicks, previous_schema(LakeTable::Clicks, 2)),
                (
                    LakeTable::Impressions,
                    previous_schema(LakeTable::Impressions, 1),
                ),
            ],
        )
        .await
        .unwrap();
        let reply = request(&env, "Update", properties(&env)).await;
        assert_eq!(reply["Status"], "SUCCESS", "{reply}");
        let clicks = iceberg_schema(LakeTable::Clicks).unwrap();
        let last_two: Vec<&str> = clicks.as_struct().fields()
            [clicks.as_struct().fields().len() - 2..]
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(
            reply["Data"]["ClicksTableSetup"],
            format!("exists, columns added: {}", last_two.join(", "))
        );
        for table in [LakeTable::Clicks, LakeTable::Impressions] {
            let t = assert_current(&old, table).await;
            assert_eq!(t.metadata().schemas_iter().count(), 2, "one schema update");
        }

        // A table whose column has another type: the update fails and the table is as it was.
        let env = super::env().await;
        let other = lake(&env).await;
        let retyped = Arc::new(
            iceberg::spec::Schema::builder()
                .with_fields(clicks.as_struct().fields().iter().map(|f| {
                    let mut f = f.as_ref().clone();
                    if f.name == "engagement_duration" {
                        *f.field_type =
                            iceberg::spec::Type::Primitive(iceberg::spec::PrimitiveType::String);
                    }
                    Arc::new(f)
                }))
                .build()
                .unwrap(),
        );
        other
            .ensure_tables_with(&env.clients.s3, &[(LakeTable::Clicks, retyped)])
            .await
            .unwrap();
        let refused = request(&env, "Update", properties(&env)).await;
        assert_eq!(refused["Status"], "FAILED", "{refused}");
        let reason = refused["Reason"].as_str().unwrap();
        assert!(reason.contains("engagement_duration"), "{reason}");
        let t = other
            .catalog()
            .load_table(&other.ident(LakeTable::Clicks))
            .await
            .unwrap();
        assert_eq!(t.metadata().schemas_iter().count(), 1, "nothing changed");
    }
}

/// Tables created before the time-only partition spec (`identity(campaign_id)`,
/// `day(impression_time)`) keep it, and the enricher writes them by it: one file per campaign
/// and day, as before, with every row landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_of_the_previous_partition_spec_are_written_by_their_own_spec() {
    use iceberg::spec::{Transform, UnboundPartitionSpec};
    let env = env().await;
    let old = lake_of(&env, "previous-version").await;
    let namespace = iceberg::NamespaceIdent::new(env.config.database.clone());
    old.catalog()
        .create_namespace(&namespace, Default::default())
        .await
        .unwrap();
    for table in [LakeTable::Clicks, LakeTable::Impressions] {
        let schema = iceberg_schema(table).unwrap().as_ref().clone();
        let id = |n: &str| schema.field_by_name(n).unwrap().id;
        let spec = UnboundPartitionSpec::builder()
            .add_partition_field(id("campaign_id"), "campaign_id", Transform::Identity)
            .unwrap()
            .add_partition_field(id("impression_time"), "impression_day", Transform::Day)
            .unwrap()
            .build();
        let creation = iceberg::TableCreation::builder()
            .name(old.ident(table).name().to_owned())
            .schema(schema)
            .partition_spec(spec)
            .build();
        old.catalog()
            .create_table(&namespace, creation)
            .await
            .unwrap();
    }
    let e = enricher(&env, "new-version").await;
    let (response, report) = handle(&e, "adpipe", &load_event("joined.json"), NOW_MS).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        report.failed
    );
    assert_eq!(report.clicks.rows_written, 2);
    assert_eq!(report.impressions.rows_written, 7);
    let clicks = e
        .lake
        .catalog()
        .load_table(&e.lake.ident(LakeTable::Clicks))
        .await
        .unwrap();
    assert_eq!(clicks.metadata().default_partition_spec().fields().len(), 2);
    let objects = read_objects(&env.clients, &env.config.lake_bucket, "lake/")
        .await
        .unwrap();
    let click_files: Vec<&String> = objects
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.contains("/enriched_clicks/data/") && k.ends_with(".parquet"))
        .collect();
    assert_eq!(
        click_files.len(),
        2,
        "one file per campaign: {click_files:?}"
    );
    assert!(
        click_files.iter().all(|k| k.contains("/campaign_id=camp-")),
        "{click_files:?}"
    );
    assert_eq!(
        column(&rows(&e, LakeTable::Clicks).await, "click_id"),
        ["clk-1", "clk-3"]
    );
}

/// A short soak, asserting by counts that a batch's lake cost does not grow with the table's
/// history: every batch writes one file (one event day), and the duplicate-key check of a
/// flagged repeat plans the same few files after 40 batches as after 10 (the files around the
/// repeat's campaigns and event times), where an unscoped check would plan all of them. Every
/// repeated row is dropped, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_files_and_key_check_do_not_grow_with_the_tables_history() {
    use adpipe_core::enrich::{enrich_impression, EnrichRules};
    use adpipe_core::lake::impressions_batch;
    use adpipe_core::model::{Impression, ImpressionRecord};
    use adpipe_core::ports::InputRange;
    use adpipe_lake::KeyScope;
    use std::collections::BTreeSet;

    const ROWS: usize = 40;
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    // 2026-11-20T00:00:00Z; 40 batches of a minute each stay within the day.
    const DAY_START_MS: i64 = 1_795_132_800_000;
    let env = env().await;
    // Snapshots expire by age; an age of zero leaves the newest `min_snapshots`, so the bound
    // is exact here (the age itself: the unit tests of `snapshots_to_expire`).
    let mut lake = local_lake_config(&env);
    lake.commit.snapshot_max_age_ms = 0;
    lake.commit.min_snapshots = 8;
    let settings = lake.commit;
    let e = aws_enricher(&env.clients, env.config.clone(), lake, "soak".into())
        .await
        .unwrap();
    let rules = EnrichRules::default();
    let impression = |b: usize, i: usize| Impression {
        ad_id: "ad-1".into(),
        // Random-looking, as UUIDs are: every file spans the whole id range, so the ids' own
        // statistics prune nothing.
        impression_id: format!("{:016x}", mix((b * 1_000 + i) as u64)),
        campaign_id: format!("camp-{:02}", (i * 7 + b) % 20),
        publisher_id: "pub-1".into(),
        event_time_ms: DAY_START_MS + (b as i64) * 60_000 + (i as i64) * 1_000,
        device_type: "mobile".into(),
        geo_location: "US".into(),
        platform: "ios".into(),
        ad_type: "banner".into(),
        bid_price: 10.0,
    };
    let append = |seq: usize, imps: Vec<(Impression, bool)>| {
        let rows: Vec<_> = imps
            .iter()
            .map(|(imp, doubt)| {
                enrich_impression(
                    &rules,
                    ImpressionRecord::new(imp, *doubt),
                    imp.event_time_ms + 1,
                )
                .unwrap()
            })
            .collect();
        LakeAppend {
            table: LakeTable::Impressions,
            input: InputRange {
                stream: "adpipe-local-joined".into(),
                shard: "shardId-000000000000".into(),
                first_sequence: format!("{:012}", seq * 1_000),
                last_sequence: format!("{:012}", seq * 1_000 + imps.len() - 1),
            },
            rows: impressions_batch(&rows).unwrap(),
            keys: imps
                .iter()
                .map(|(i, _)| (i.impression_id.clone(), String::new()))
                .collect(),
            in_doubt: imps.iter().map(|(_, d)| *d).collect(),
        }
    };
    let ident = e.lake.ident(LakeTable::Impressions);
    let everything = KeyScope {
        campaigns: (0..20).map(|c| format!("camp-{c:02}")).collect(),
        min_time_us: i64::MIN / 2,
        max_time_us: i64::MAX / 2,
    };
    let as_set = |files: &[(String, u64)]| files.iter().cloned().collect::<BTreeSet<_>>();
    let mut plans = Vec::new();
    let mut fetched_by_check = Vec::new();
    let mut rows_read = Vec::new();
    let mut seq = 0;
    for b in 0..40 {
        seq += 1;
        let batch: Vec<_> = (0..ROWS).map(|i| (impression(b, i), false)).collect();
        let r = e.lake.append(append(seq, batch)).await.unwrap();
        assert_eq!(
            (r.rows_written, r.files_written),
            (ROWS as u64, 1),
            "batch {b}"
        );
        if b == 9 || b == 39 {
            // A later batch repeats three rows of this one, flagged; then another repeats
            // three more. The first check fetches the manifests written since this writer's
            // last check (all of them at batch 9), the second finds them all in its cache.
            for k in 0..2 {
                seq += 1;
                let repeat = append(
                    seq,
                    (0..3).map(|i| (impression(b, i * 5 + k), true)).collect(),
                );
                let scope = KeyScope::of_rows(&repeat.rows, &repeat.in_doubt)
                    .unwrap()
                    .unwrap();
                let before = e.lake.manifest_reads();
                let r = e.lake.append(repeat).await.unwrap();
                assert_eq!((r.duplicates_dropped, r.rows_written), (3, 0), "batch {b}");
                let after = e.lake.manifest_reads();
                fetched_by_check.push((b + 1, k, after.fetched - before.fetched));
                if k == 1 {
                    assert!(after.cached > before.cached, "batch {b}: the cache served");
                    continue;
                }
                // What the check planned, against iceberg-rust's own planning of the same
                // scope: the same files (partition and statistics pruning agree).
                let table = e.lake.catalog().load_table(&ident).await.unwrap();
                let plan = e.lake.key_check_plan(&table, &scope).await.unwrap();
                let theirs = adpipe_lake::query_plan(&table, &scope).await.unwrap();
                assert_eq!(as_set(&plan.files), as_set(&theirs), "batch {b}");
                let all = e.lake.key_check_plan(&table, &everything).await.unwrap();
                let theirs = adpipe_lake::query_plan(&table, &everything).await.unwrap();
                assert_eq!(as_set(&all.files), as_set(&theirs), "batch {b}");
                plans.push((b + 1, plan.files.len(), all.files.len()));
                rows_read.push(plan.rows);
            }
        }
    }
    let [(n1, scoped1, all1), (n2, scoped2, all2)] = plans[..] else {
        panic!("{plans:?}")
    };
    assert_eq!((n1, all1), (10, 10), "unscoped, the check plans every file");
    assert_eq!((n2, all2), (40, 40), "and that grows with the history");
    assert!(scoped1 <= 2 && scoped2 <= 2, "{plans:?}");
    assert_eq!(
        scoped1, scoped2,
        "the scoped check does not grow: {plans:?}"
    );
    assert!(
        rows_read[0] == rows_read[1] && rows_read[1] <= 2 * ROWS as u64,
        "rows the check reads, after 10 and 40 batches: {rows_read:?}"
    );
    // Manifests fetched by a check: at most the manifests a snapshot lists (merged at 16),
    // whatever the history, and none when nothing was committed since the writer's last one.
    let merge = adpipe_lake::CommitSettings::default().manifest_merge_count as u64;
    for (n, k, fetched) in &fetched_by_check {
        assert!(*fetched <= merge, "{fetched_by_check:?}");
        if *k == 1 {
            assert_eq!(*fetched, 0, "after {n} batches: {fetched_by_check:?}");
        } else {
            assert!(*fetched >= 1, "after {n} batches: {fetched_by_check:?}");
        }
    }
    let landed = column(&rows(&e, LakeTable::Impressions).await, "impression_id");
    assert_eq!(landed.len(), 40 * ROWS, "every row once");

    // A one-campaign query of ten of the forty minutes plans the ten files of those minutes:
    // the files' impression_time statistics prune the others (each batch is a minute here).
    let table = e.lake.catalog().load_table(&ident).await.unwrap();
    let ten_minutes = KeyScope {
        campaigns: ["camp-03".to_owned()].into(),
        min_time_us: (DAY_START_MS + 10 * 60_000) * 1_000,
        max_time_us: (DAY_START_MS + 20 * 60_000) * 1_000 - 1,
    };
    let files = adpipe_lake::query_plan(&table, &ten_minutes).await.unwrap();
    assert_eq!(
        files.len(),
        10,
        "a ten-minute query plans its ten minutes' files, of 40"
    );

    // The commits' own metadata is bounded by the settings, not by the 40 commits: merged
    // manifests, expired snapshots, and a ledger of one shard.
    let table = e.lake.catalog().load_table(&ident).await.unwrap();
    let metadata = table.metadata();
    let manifests = table
        .manifest_list_reader(metadata.current_snapshot().unwrap())
        .load()
        .await
        .unwrap()
        .entries()
        .len();
    assert!(
        (1..settings.manifest_merge_count).contains(&manifests),
        "{manifests} manifests after 40 commits"
    );
    assert_eq!(metadata.snapshots().len(), settings.min_snapshots);
    assert_eq!(
        metadata
            .properties()
            .get("history.expire.min-snapshots-to-keep")
            .map(String::as_str),
        Some("8"),
        "the table carries the retention its writers use"
    );
    assert!(
        metadata.metadata_log().len() <= settings.previous_metadata,
        "{} previous metadata files listed",
        metadata.metadata_log().len()
    );
    // The files that fell out of the log are deleted: the listed ones and the current one stay
    // (over 40 commits, 42 metadata files were written).
    let prefix = format!(
        "{}/metadata/",
        metadata
            .location()
            .split_once(&format!("{}/", env.config.lake_bucket))
            .unwrap()
            .1
    );
    let metadata_files = read_objects(&env.clients, &env.config.lake_bucket, &prefix)
        .await
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.ends_with(".metadata.json"))
        .count();
    assert!(
        metadata_files <= settings.previous_metadata + 1,
        "{metadata_files} metadata.json files under {prefix}"
    );
    let ledger = adpipe_lake::commit::ledger_of(&table, settings.ledger).unwrap();
    assert_eq!(ledger.shards.len(), 1);
    assert_eq!(
        ledger.shards[0].recent.len(),
        settings.ledger.recent_batches
    );
    assert!(ledger.shards[0].ranges.len() <= settings.ledger.ranges_per_shard);
    // The first batch is long expired from the snapshots, yet a replay of it is recognised
    // by the ledger and lands nothing.
    let first: Vec<_> = (0..ROWS).map(|i| (impression(0, i), false)).collect();
    let r = e.lake.append(append(1, first)).await.unwrap();
    assert_eq!((r.rows_written, r.duplicates_dropped), (0, ROWS as u64));
    assert_eq!(
        column(&rows(&e, LakeTable::Impressions).await, "impression_id").len(),
        40 * ROWS
    );
}

/// The lake among its peers: while two enricher environments (a shard at
/// `ParallelizationFactor` 2) land batch after batch into `impressions`, a second Iceberg
/// implementation (pyiceberg, `tools/foreign_writer.py`) commits to the same table over and
/// over: appends, row deletes, a compaction-like rewrite of a partition into one file, an
/// added column and a tag. Every commit of either side is conditional on what it read (Glue's
/// `VersionId`, which the local endpoint enforces as Glue does), so neither overwrites the
/// other: every foreign commit lands within its own retries, every enricher row lands exactly
/// once, deleted rows stay deleted, the tag and the new column survive the enricher's commits
/// (its snapshot expiry keeps refs), a new enricher environment starts on the altered table and
/// writes null in the foreign column, and pyiceberg and DuckDB read the result.
///
/// Pacing. On the stack a lane commits once per batching window (60 s by default) while a
/// foreign operation (an Athena `DELETE`, a compaction) takes seconds: the table changes several
/// times less often than one foreign attempt lasts. The test compresses time, so it keeps that
/// ratio on whatever machine runs it, rather than a fixed period: each lane pauses about twice
/// the foreign writer's longest recent attempt (its progress file), at least 1 s and at most 8 s,
/// jittered by ±50 %. At a fixed 1 s, a shared 2-core machine running the binary's other tests
/// beside it made pyiceberg's copy-on-write delete (a scan of the whole table) slower than the
/// lanes' commits, and the growing table slower still, until it starved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_iceberg_writer_commits_beside_the_enricher_and_nothing_is_lost() {
    use adpipe_core::enrich::{enrich_impression, EnrichRules};
    use adpipe_core::lake::impressions_batch;
    use adpipe_core::model::{Impression, ImpressionRecord};
    use adpipe_core::ports::InputRange;
    use std::collections::BTreeMap;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicBool, Ordering};

    const ROWS: usize = 25;
    const MIN_BATCHES: usize = 6;
    let env = env().await;
    let e = enricher(&env, "enricher-0").await;
    let ident = e.lake.ident(LakeTable::Impressions);
    let now_ms = adpipe_it::recent_start_ms(0);
    let rules = EnrichRules::default();
    let batch = move |lane: usize, b: usize| {
        let seq = (2 * b + lane) * 1_000;
        let imps: Vec<Impression> = (0..ROWS)
            .map(|i| Impression {
                ad_id: "ad-1".into(),
                impression_id: format!("imp-{lane}-{b:03}-{i:02}"),
                campaign_id: format!("camp-{}", i % 5),
                publisher_id: "pub-1".into(),
                // Three event hours, so partitions gather several files each.
                event_time_ms: now_ms - (b % 3) as i64 * 3_600_000 + i as i64,
                device_type: "mobile".into(),
                geo_location: "US".into(),
                platform: "ios".into(),
                ad_type: "banner".into(),
                bid_price: 10.0,
            })
            .collect();
        let rows: Vec<_> = imps
            .iter()
            .map(|imp| {
                let record = ImpressionRecord::new(imp, false);
                enrich_impression(&rules, record, imp.event_time_ms + 1).unwrap()
            })
            .collect();
        LakeAppend {
            table: LakeTable::Impressions,
            input: InputRange {
                stream: "adpipe-local-joined".into(),
                shard: "shardId-000000000000".into(),
                first_sequence: format!("{seq:012}"),
                last_sequence: format!("{:012}", seq + ROWS - 1),
            },
            rows: impressions_batch(&rows).unwrap(),
            keys: imps
                .iter()
                .map(|i| (i.impression_id.clone(), String::new()))
                .collect(),
            in_doubt: vec![false; ROWS],
        }
    };

    // The foreign writer, until the enricher is done.
    let until = std::env::temp_dir().join(unique("foreign-writer-done"));
    let progress = std::env::temp_dir().join(unique("foreign-writer-progress"));
    let root = adpipe_it::workspace_root();
    let foreign = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("tools/foreign_writer.py"))
        .args([
            "--endpoint",
            &env.endpoint,
            "--database",
            &env.config.database,
        ])
        .args(["--table", ident.name(), "--key-column", "impression_id"])
        .args(["--until-file", until.to_str().unwrap()])
        .args([
            "--max-seconds",
            "400",
            "--min-rounds",
            "2",
            "--max-retries",
            "200",
        ])
        .args(["--seed", "7", "--new-column", "analyst_note"])
        .args(["--progress-file", progress.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Killed if the test fails before it ends, rather than left writing to a closed endpoint.
    struct Reaped(Option<std::process::Child>);
    impl Drop for Reaped {
        fn drop(&mut self) {
            if let Some(mut child) = self.0.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let mut foreign = Reaped(Some(foreign));

    // Two lanes of one shard, each its own environment (its own writer name), until the
    // foreign writer's column and tag are in the table and each lane landed MIN_BATCHES.
    let altered = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let lake0 = Arc::new(lake_of(&env, "enricher-0").await);
    let lake1 = Arc::new(lake_of(&env, "enricher-1").await);
    for (lane, lake) in [(0usize, lake0.clone()), (1, lake1.clone())] {
        let altered = altered.clone();
        let progress = progress.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = adpipe_core::rng::Rng::new(lane as u64 + 1);
            let (mut landed, mut retries, mut foreign_columns) = (0usize, 0u32, 0u64);
            let started = std::time::Instant::now();
            let mut b = 0;
            while b < MIN_BATCHES
                || (!altered.load(Ordering::SeqCst) && started.elapsed().as_secs() < 300)
            {
                let report = lake.append(batch(lane, b)).await.unwrap();
                assert_eq!(report.rows_written, ROWS as u64, "lane {lane} batch {b}");
                retries += report.commit_retries;
                foreign_columns = foreign_columns.max(report.foreign_columns);
                landed += 1;
                b += 1;
                // Paced by the foreign writer's attempts (see the test's comment).
                let longest = std::fs::read(&progress)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|p| p["longest_recent_attempt_seconds"].as_f64())
                    .unwrap_or(0.0);
                let pause = (2.0 * longest).clamp(1.0, 8.0) * (0.5 + rng.unit());
                tokio::time::sleep(std::time::Duration::from_secs_f64(pause)).await;
            }
            (landed, retries, foreign_columns)
        }));
    }
    // Watch for the column and the tag.
    let watcher = {
        let altered = altered.clone();
        let lake = lake0.clone();
        let ident = ident.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            while started.elapsed().as_secs() < 300 {
                let t = lake.catalog().load_table(&ident).await.unwrap();
                let column = t
                    .metadata()
                    .current_schema()
                    .field_by_name("analyst_note")
                    .is_some();
                if column && t.metadata().snapshot_for_ref("audit-7").is_some() {
                    altered.store(true, Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        })
    };
    let mut lane_batches = BTreeMap::new();
    let mut enricher_retries = 0;
    let mut saw_foreign_columns = 0;
    for (lane, h) in handles.into_iter().enumerate() {
        let (landed, retries, foreign_columns) = h.await.unwrap();
        lane_batches.insert(lane, landed);
        enricher_retries += retries;
        saw_foreign_columns = saw_foreign_columns.max(foreign_columns);
    }
    watcher.await.unwrap();
    assert!(
        altered.load(Ordering::SeqCst),
        "the foreign column and tag appeared"
    );

    // A new environment starts on the altered table (ensure_tables accepts the foreign column)
    // and lands a batch with null there.
    let late = aws_enricher(
        &env.clients,
        env.config.clone(),
        local_lake_config(&env),
        "enricher-2".into(),
    )
    .await
    .expect("a cold start accepts a table with a foreign column");
    let report = late.lake.append(batch(0, 500)).await.unwrap();
    assert_eq!(report.rows_written, ROWS as u64);
    assert_eq!(report.foreign_columns, 1, "analyst_note, written as null");
    std::fs::write(&until, b"done").unwrap();
    let output = foreign.0.take().unwrap().wait_with_output().unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    println!(
        "foreign writer: {}",
        serde_json::to_string_pretty(&summary).unwrap()
    );
    println!(
        "enricher: {lane_batches:?} batches per lane + 1, {enricher_retries} commit retries, foreign columns seen {saw_foreign_columns}"
    );
    assert!(
        output.status.success() && summary["error"].is_null(),
        "{summary}"
    );
    let ops = &summary["ops"];
    for op in ["append", "delete", "add_column", "tag"] {
        assert!(
            ops[op]["landed"].as_u64().unwrap() >= 1,
            "{op} landed: {summary}"
        );
        assert_eq!(ops[op]["abandoned"], 0, "{op}: {summary}");
    }

    // Every enricher row exactly once unless deleted; deleted rows stay deleted; the foreign
    // rows are there; the new column is null in every enricher row.
    let deleted: std::collections::HashSet<String> = summary["deleted_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    assert!(!deleted.is_empty());
    let mut expected: Vec<String> = lane_batches
        .iter()
        .flat_map(|(lane, n)| {
            (0..*n).flat_map(move |b| (0..ROWS).map(move |i| format!("imp-{lane}-{b:03}-{i:02}")))
        })
        .chain((0..ROWS).map(|i| format!("imp-0-500-{i:02}")))
        .filter(|k| !deleted.contains(k))
        .collect();
    let foreign_keys: Vec<String> = summary["appended_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    expected.extend(foreign_keys.iter().cloned());
    expected.sort();
    let batches = rows(&late, LakeTable::Impressions).await;
    assert_eq!(column(&batches, "impression_id"), expected, "each row once");
    for b in &batches {
        let keys = arrow_array::cast::as_string_array(b.column_by_name("impression_id").unwrap());
        let note = b.column_by_name("analyst_note").unwrap();
        for row in 0..b.num_rows() {
            if keys.value(row).starts_with("imp-") {
                assert!(note.is_null(row), "{}", keys.value(row));
            }
        }
    }
    // The tag survived every enricher commit, and main kept the retention it had.
    let t = late.lake.catalog().load_table(&ident).await.unwrap();
    let tagged = summary["tag"]["snapshot_id"].as_i64().unwrap();
    assert_eq!(
        t.metadata()
            .snapshot_for_ref("audit-7")
            .map(|s| s.snapshot_id()),
        Some(tagged)
    );
    assert!(t
        .metadata()
        .properties()
        .get("commit.retry.num-retries")
        .is_none());

    // pyiceberg and DuckDB read both tables.
    let db = env.config.database.clone();
    let scan = adpipe_it::lake_check(
        &env.endpoint,
        &[
            "scan",
            "--database",
            &db,
            "--table",
            "enriched_clicks",
            "--table",
            "impressions",
        ],
    )
    .unwrap();
    assert_eq!(
        scan["impressions"]["rows"].as_array().unwrap().len(),
        expected.len()
    );
    let dir = std::env::temp_dir().join(unique("foreign-sql"));
    std::fs::create_dir_all(&dir).unwrap();
    let sql = dir.join("counts.sql");
    std::fs::write(
        &sql,
        "SELECT (SELECT count(*) FROM enriched_clicks) AS clicks, (SELECT count(*) FROM impressions) AS impressions",
    )
    .unwrap();
    let q = adpipe_it::lake_check(
        &env.endpoint,
        &["query", "--database", &db, "--file", sql.to_str().unwrap()],
    )
    .unwrap();
    assert_eq!(
        q["counts.sql"]["rows"][0],
        serde_json::json!([0, expected.len()])
    );
}

/// Glue applies an `UpdateTable` that carries a `VersionId` only if the table is still at that
/// version; every Iceberg writer on Glue (the enricher's commit, pyiceberg, Java's
/// `GlueTableOperations`) relies on it never to overwrite another's commit. The local endpoint
/// enforces it as Glue does (plain moto ignores the `VersionId` and passes this test's stale
/// update): a writer that read the table before the enricher's commit is refused with
/// `ConcurrentModificationException` and the commit stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_glue_table_version_is_refused_as_glue_refuses_it() {
    let env = env().await;
    let e = enricher(&env, "test-writer").await;
    let glue = aws_sdk_glue::Client::new(&LocalAws::shared().sdk_config().await);
    let name = e.lake.ident(LakeTable::Impressions).name().to_owned();
    let read = glue
        .get_table()
        .database_name(&env.config.database)
        .name(&name)
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    let stale_version = read.version_id().unwrap().to_owned();
    // The enricher commits meanwhile.
    let (response, _) = handle(&e, "adpipe", &load_event("joined.json"), NOW_MS).await;
    assert!(response.batch_item_failures.is_empty());
    let committed = glue
        .get_table()
        .database_name(&env.config.database)
        .name(&name)
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    let location =
        |t: &aws_sdk_glue::types::Table| t.parameters().unwrap()["metadata_location"].clone();
    assert_ne!(committed.version_id(), Some(stale_version.as_str()));
    // The stale writer points the table back at what it read.
    let input = aws_sdk_glue::types::TableInput::builder()
        .name(&name)
        .set_table_type(read.table_type().map(str::to_owned))
        .set_parameters(read.parameters().cloned())
        .build()
        .unwrap();
    let refused = glue
        .update_table()
        .database_name(&env.config.database)
        .table_input(input.clone())
        .version_id(&stale_version)
        .send()
        .await
        .expect_err("a stale VersionId is refused");
    let service = refused.into_service_error();
    assert!(
        service.is_concurrent_modification_exception(),
        "{service:?}"
    );
    let after = glue
        .get_table()
        .database_name(&env.config.database)
        .name(&name)
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    assert_eq!(location(&after), location(&committed), "the commit stays");
    assert_eq!(after.version_id(), committed.version_id());
    // The current version is accepted (and, without a VersionId, any update, as on Glue).
    glue.update_table()
        .database_name(&env.config.database)
        .table_input(
            aws_sdk_glue::types::TableInput::builder()
                .name(&name)
                .set_table_type(after.table_type().map(str::to_owned))
                .set_parameters(after.parameters().cloned())
                .build()
                .unwrap(),
        )
        .version_id(after.version_id().unwrap())
        .send()
        .await
        .unwrap();
}

/// Another writer changes the partition spec after the enricher wrote a batch's files and
/// before it commits them (here: while it waits for the commit lease, which the test holds).
/// The enricher does not list files written for the old spec under the new one: it writes the
/// batch again for the new spec, commits that, and every row lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_spec_changed_before_the_commit_gets_the_files_written_again() {
    let env = env().await;
    let e = enricher(&env, "enricher").await;
    let ident = e.lake.ident(LakeTable::Clicks);
    let lease =
        DynamoDbCommitLease::new(env.clients.dynamodb.clone(), &env.config.commit_lease_table);
    let held = lease.acquire(&ident.to_string(), "test").await.unwrap();
    let data_files = || async {
        read_objects(&env.clients, &env.config.lake_bucket, "lake/")
            .await
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k.contains("/enriched_clicks/data/") && k.ends_with(".parquet"))
            .count()
    };
    let event = load_event("joined.json");
    let writing = handle(&e, "adpipe", &event, NOW_MS);
    let change = async {
        // The batch's files are written; its commit waits for the lease.
        let started = std::time::Instant::now();
        while data_files().await == 0 {
            assert!(started.elapsed().as_secs() < 60, "no data file written");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let written_first = data_files().await;
        // Another writer partitions the table by campaign as well (pyiceberg's spec update).
        let root = adpipe_it::workspace_root();
        let script = format!(
            "import sys; sys.path.insert(0, {tools:?}); import lake_check as l; l.aws_env(None); \
             t = l.glue_catalog({endpoint:?}).load_table({table:?}); \
             u = t.update_spec(); u.add_identity('campaign_id'); u.commit()",
            tools = root.join("tools").to_str().unwrap(),
            endpoint = env.endpoint,
            table = format!("{}.{}", env.config.database, ident.name()),
        );
        let out = std::process::Command::new(root.join(".venv/bin/python"))
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        lease.release(held).await.unwrap();
        written_first
    };
    let ((response, report), written_first) = tokio::join!(writing, change);
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        report.failed
    );
    assert_eq!(report.clicks.rows_written, 2);
    assert!(report.clicks.commit_retries >= 1, "{:?}", report.clicks);
    // Written again, for the new spec: one file per campaign now, beside the first attempt's
    // files (orphans, never listed).
    let table = e.lake.catalog().load_table(&ident).await.unwrap();
    let spec = table.metadata().default_partition_spec();
    assert_eq!(spec.fields().len(), 2);
    let listed: Vec<String> = table
        .scan()
        .build()
        .unwrap()
        .plan_files()
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .iter()
        .map(|task| task.data_file_path.clone())
        .collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed.iter().all(|p| p.contains("/campaign_id=")),
        "listed under the new spec: {listed:?}"
    );
    assert_eq!(data_files().await, written_first + 2);
    assert_eq!(
        column(&rows(&e, LakeTable::Clicks).await, "click_id"),
        ["clk-1", "clk-3"]
    );
}
