//! `adpipe --stack NAME`: the names come from the stack's CloudFormation outputs, and generate,
//! replay and redrive act on that stack's streams and queue. The stack is created on the local
//! endpoint (which serves CloudFormation) from a template with `template.yaml`'s output keys.

use std::sync::Arc;
use std::time::Duration;

use adpipe_core::config::{EnricherConfig, JoinerConfig, ENRICHER_ENV, JOINER_ENV};
use adpipe_it::{read_stream, unique, workspace_root, LocalAws};
use adpipe_local::events::StageNames;
use adpipe_local::generator::{generate, TrafficConfig};
use adpipe_local::progress::Counter;
use adpipe_local::redrive::redrive;
use adpipe_local::replay::{send_rated, Order};
use adpipe_local::stack::*;
use aws_sdk_kinesis::types::ShardIteratorType;

/// A stack with the streams and queue the commands use, and `template.yaml`'s output keys.
fn template(prefix: &str) -> String {
    let stream = |name: &str| {
        serde_json::json!({"Type": "AWS::Kinesis::Stream",
            "Properties": {"Name": format!("{prefix}-{name}"), "ShardCount": 1}})
    };
    serde_json::json!({
        "AWSTemplateFormatVersion": "2010-09-09",
        // One of template.yaml's parameters, left at a default other than the code's, so the
        // env file shows that parameters come from the stack.
        "Parameters": {
            "WarmWindowSeconds": {"Type": "String", "Default": "5000"},
            // A disposable stage, as the dev stage in samconfig.toml.
            "RetainData": {"Type": "String", "Default": "false"},
        },
        "Resources": {
            "ImpressionsStream": stream("impressions"),
            "ClicksStream": stream("clicks"),
            "JoinedStream": stream("joined"),
            "OnFailureQueue": {"Type": "AWS::SQS::Queue",
                "Properties": {"QueueName": format!("{prefix}-on-failure")}},
            "LakeBucket": {"Type": "AWS::S3::Bucket",
                "Properties": {"BucketName": format!("{prefix}-lake")}},
            "CommitLeaseTable": {"Type": "AWS::DynamoDB::Table", "Properties": {
                "TableName": format!("{prefix}-commit-lease"),
                "BillingMode": "PAY_PER_REQUEST",
                "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
                "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}]}},
        },
        // The keys of template.yaml's outputs; what this stack does not create (the Glue
        // database, which the enricher creates, the functions, the workgroup) as plain names.
        "Outputs": {
            IMPRESSIONS_STREAM_OUTPUT: {"Value": {"Ref": "ImpressionsStream"}},
            CLICKS_STREAM_OUTPUT: {"Value": {"Ref": "ClicksStream"}},
            JOINED_STREAM_OUTPUT: {"Value": {"Ref": "JoinedStream"}},
            IMPRESSIONS_STREAM_ARN_OUTPUT: {"Value": {"Fn::GetAtt": ["ImpressionsStream", "Arn"]}},
            CLICKS_STREAM_ARN_OUTPUT: {"Value": {"Fn::GetAtt": ["ClicksStream", "Arn"]}},
            JOINED_STREAM_ARN_OUTPUT: {"Value": {"Fn::GetAtt": ["JoinedStream", "Arn"]}},
            ON_FAILURE_QUEUE_OUTPUT: {"Value": {"Ref": "OnFailureQueue"}},
            LAKE_BUCKET_OUTPUT: {"Value": {"Ref": "LakeBucket"}},
            COMMIT_LEASE_TABLE_OUTPUT: {"Value": {"Ref": "CommitLeaseTable"}},
            GLUE_DATABASE_OUTPUT: {"Value": format!("{}_db", prefix.replace('-', "_"))},
            CLICKS_TABLE_OUTPUT: {"Value": "enriched_clicks"},
            IMPRESSIONS_TABLE_OUTPUT: {"Value": "impressions"},
            STATE_LOG_TABLE_OUTPUT: {"Value": format!("{prefix}-join-log")},
            "KeyedStreamName": {"Value": format!("{prefix}-keyed")},
            WORKGROUP_OUTPUT: {"Value": format!("{prefix}-wg")},
            JOINER_FUNCTION_OUTPUT: {"Value": format!("{prefix}-joiner")},
            ENRICHER_FUNCTION_OUTPUT: {"Value": format!("{prefix}-enricher")},
            METRICS_NAMESPACE_OUTPUT: {"Value": "adpipe"},
            "Region": {"Value": {"Ref": "AWS::Region"}},
            "JoinerRoleArn": {"Value": format!("arn:aws:iam::123456789012:role/{prefix}-joiner")},
            "EnricherRoleArn": {"Value": format!("arn:aws:iam::123456789012:role/{prefix}-enricher")},
        },
    })
    .to_string()
}

struct Stack {
    name: String,
    prefix: String,
    sdk: aws_config::SdkConfig,
}

async fn create_stack() -> Stack {
    let sdk = LocalAws::shared().sdk_config().await;
    let cfn = aws_sdk_cloudformation::Client::new(&sdk);
    let prefix = unique("stk");
    let name = format!("{prefix}-stack");
    cfn.create_stack()
        .stack_name(&name)
        .template_body(template(&prefix))
        .send()
        .await
        .expect("CreateStack");
    for _ in 0..100 {
        let d = cfn
            .describe_stacks()
            .stack_name(&name)
            .send()
            .await
            .unwrap();
        let status = d.stacks()[0].stack_status().map(|s| s.as_str().to_owned());
        if status.as_deref() == Some("CREATE_COMPLETE") {
            return Stack { name, prefix, sdk };
        }
        assert!(
            !status.as_deref().unwrap_or("").contains("FAILED"),
            "{status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("stack {name} was not created");
}

fn counters() -> (Arc<Counter>, Arc<Counter>) {
    (Counter::new("i", 0), Counter::new("c", 0))
}

#[test]
fn the_output_keys_are_template_yamls() {
    let template = std::fs::read_to_string(workspace_root().join("template.yaml")).unwrap();
    let outputs = &template[template.find("\nOutputs:").expect("Outputs")..];
    for key in [
        IMPRESSIONS_STREAM_OUTPUT,
        CLICKS_STREAM_OUTPUT,
        JOINED_STREAM_OUTPUT,
        ON_FAILURE_QUEUE_OUTPUT,
    ] {
        assert!(outputs.contains(&format!("\n  {key}:")), "{key}");
    }
}

#[tokio::test]
async fn names_resolve_from_the_stacks_outputs() {
    let s = create_stack().await;
    let cfn = aws_sdk_cloudformation::Client::new(&s.sdk);
    let t = StackTarget::resolve(&cfn, &s.name).await.unwrap();
    assert_eq!(t.stack, s.name);
    assert_eq!(t.impressions_stream, format!("{}-impressions", s.prefix));
    assert_eq!(t.clicks_stream, format!("{}-clicks", s.prefix));
    assert_eq!(t.joined_stream, format!("{}-joined", s.prefix));
    assert!(
        t.on_failure_queue_url
            .ends_with(&format!("/{}-on-failure", s.prefix)),
        "{}",
        t.on_failure_queue_url
    );
    let missing = StackTarget::resolve(&cfn, &unique("no-such-stack")).await;
    assert!(missing.is_err(), "{missing:?}");
}

#[tokio::test]
async fn generated_traffic_goes_to_the_stacks_input_streams() {
    let s = create_stack().await;
    let cfn = aws_sdk_cloudformation::Client::new(&s.sdk);
    let t = StackTarget::resolve(&cfn, &s.name).await.unwrap();
    let traffic = generate(&TrafficConfig {
        impressions: 300,
        ctr: 0.2,
        start_ms: adpipe_it::recent_start_ms(TrafficConfig::default().duration_ms),
        ..TrafficConfig::default()
    })
    .unwrap();
    let kinesis = aws_sdk_kinesis::Client::new(&s.sdk);
    send_rated(
        &kinesis,
        &t.impressions_stream,
        &t.clicks_stream,
        &traffic.impression_records,
        &traffic.click_records,
        Order::ClicksFirst,
        Some(5_000.0),
        &counters(),
    )
    .await
    .unwrap();
    let clients = LocalAws::shared().clients().await;
    let mut imps = read_stream(&clients, &t.impressions_stream).await.unwrap();
    let mut clicks = read_stream(&clients, &t.clicks_stream).await.unwrap();
    let (mut want_imps, mut want_clicks) = (
        traffic.impression_records.clone(),
        traffic.click_records.clone(),
    );
    for v in [&mut imps, &mut clicks, &mut want_imps, &mut want_clicks] {
        v.sort();
    }
    assert!(!want_clicks.is_empty());
    assert_eq!(imps, want_imps);
    assert_eq!(clicks, want_clicks);
    assert!(read_stream(&clients, &t.joined_stream)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn redrive_reads_the_stacks_on_failure_queue() {
    let s = create_stack().await;
    let cfn = aws_sdk_cloudformation::Client::new(&s.sdk);
    let t = StackTarget::resolve(&cfn, &s.name).await.unwrap();
    let kinesis = aws_sdk_kinesis::Client::new(&s.sdk);
    let sqs = aws_sdk_sqs::Client::new(&s.sdk);
    let records: Vec<Vec<u8>> = (0..3)
        .map(|i| format!(r#"{{"impression_id":"imp-{i}"}}"#).into_bytes())
        .collect();
    send_rated(
        &kinesis,
        &t.impressions_stream,
        &t.clicks_stream,
        &records,
        &[],
        Order::Interleaved,
        None,
        &counters(),
    )
    .await
    .unwrap();
    // A pointer to the three records, as Lambda's on-failure destination writes it.
    let shard = kinesis
        .list_shards()
        .stream_name(&t.impressions_stream)
        .send()
        .await
        .unwrap()
        .shards()[0]
        .shard_id()
        .to_owned();
    let iterator = kinesis
        .get_shard_iterator()
        .stream_name(&t.impressions_stream)
        .shard_id(&shard)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .unwrap()
        .shard_iterator
        .unwrap();
    let page = kinesis
        .get_records()
        .shard_iterator(iterator)
        .send()
        .await
        .unwrap();
    let seqs: Vec<&str> = page.records().iter().map(|r| r.sequence_number()).collect();
    assert_eq!(seqs.len(), 3);
    let arn = kinesis
        .describe_stream_summary()
        .stream_name(&t.impressions_stream)
        .send()
        .await
        .unwrap()
        .stream_description_summary()
        .unwrap()
        .stream_arn()
        .to_owned();
    let body = serde_json::json!({"KinesisBatchInfo": {
        "shardId": shard, "startSequenceNumber": seqs[0], "endSequenceNumber": seqs[2],
        "batchSize": 3, "streamArn": arn}});
    sqs.send_message()
        .queue_url(&t.on_failure_queue_url)
        .message_body(body.to_string())
        .send()
        .await
        .unwrap();

    let done = redrive(&kinesis, &sqs, &t.on_failure_queue_url, &t.joined_stream)
        .await
        .unwrap();
    assert_eq!((done.batches, done.records), (1, 3));
    let clients = LocalAws::shared().clients().await;
    let mut on_stream = read_stream(&clients, &t.impressions_stream).await.unwrap();
    on_stream.sort();
    let mut want: Vec<Vec<u8>> = records.iter().chain(&records).cloned().collect();
    want.sort();
    assert_eq!(on_stream, want, "the originals and their redriven copies");
    // The handled pointer is gone: a second redrive finds nothing.
    let again = redrive(&kinesis, &sqs, &t.on_failure_queue_url, &t.joined_stream)
        .await
        .unwrap();
    assert_eq!((again.batches, again.records), (0, 0));
}

async fn resolved() -> (Stack, StackTarget) {
    let s = create_stack().await;
    let cfn = aws_sdk_cloudformation::Client::new(&s.sdk);
    let t = StackTarget::resolve(&cfn, &s.name).await.unwrap();
    (s, t)
}

fn env_of(target: &StackTarget) -> std::collections::BTreeMap<String, String> {
    target
        .lambda_env_file()
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn stage_names(t: &StackTarget) -> StageNames {
    StageNames::from_stream_arns(
        t.output(IMPRESSIONS_STREAM_ARN_OUTPUT).unwrap(),
        t.output(CLICKS_STREAM_ARN_OUTPUT).unwrap(),
        t.output(JOINED_STREAM_ARN_OUTPUT).unwrap(),
        t.outputs.get("JoinerRoleArn").map(String::as_str),
        t.outputs.get("EnricherRoleArn").map(String::as_str),
    )
    .unwrap()
}

/// `adpipe --stack S env`: a complete configuration of both functions, with the stack's names.
#[tokio::test]
async fn the_env_file_configures_both_functions_with_the_stacks_names() {
    let (s, t) = resolved().await;
    let env = env_of(&t);
    // Every variable either function reads, not only the names this test looks at.
    for var in JOINER_ENV.iter().chain(ENRICHER_ENV) {
        assert!(env.contains_key(*var), "{var} is not in the env file");
    }
    let joiner = JoinerConfig::from_lookup(|k| env.get(k).cloned()).unwrap();
    assert_eq!(joiner.impressions_stream, t.impressions_stream);
    assert_eq!(joiner.clicks_stream, t.clicks_stream);
    assert_eq!(joiner.state_log_table, format!("{}-join-log", s.prefix));
    assert_eq!(joiner.keyed_stream, format!("{}-keyed", s.prefix));
    assert_eq!(joiner.warm_window_ms, 5_000_000, "the stack's parameter");
    let enricher = EnricherConfig::from_lookup(|k| env.get(k).cloned()).unwrap();
    assert_eq!(enricher.lake_bucket, format!("{}-lake", s.prefix));
    assert_eq!(
        enricher.commit_lease_table,
        format!("{}-commit-lease", s.prefix)
    );
    assert_eq!(env.get("AWS_REGION").map(String::as_str), Some("us-east-1"));
}

/// `adpipe --stack S events`: every record of the rendered fixtures names one of the stack's
/// streams, so the joiner configured for the stack reads them as impressions and clicks (not
/// `unknown_source`), and the enricher takes the joined fixture from the stack's joined stream.
#[tokio::test]
async fn rendered_events_name_the_stacks_streams() {
    let (_s, t) = resolved().await;
    let names = stage_names(&t);
    let dir = std::env::temp_dir().join(unique("events"));
    let written = adpipe_local::events::write_all(&dir, &names).unwrap();
    assert_eq!(written.len(), adpipe_local::events::FIXTURES.len());
    let env = env_of(&t);
    let joiner = JoinerConfig::from_lookup(|k| env.get(k).cloned()).unwrap();
    let expected = |file: &str| match file {
        "clicks.json" | "hostile-clicks.json" => joiner.clicks_stream.clone(),
        "joined.json" => t.joined_stream.clone(),
        _ => joiner.impressions_stream.clone(),
    };
    for path in &written {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let event: adpipe_lambda::KinesisBatch =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let records = adpipe_lambda::input_records(&event);
        assert!(!records.is_empty(), "{file}");
        for r in &records {
            assert_eq!(r.position.stream, expected(&file), "{file}");
        }
        let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        for r in raw["Records"].as_array().unwrap() {
            let arn = r["eventSourceARN"].as_str().unwrap();
            assert!(
                [
                    t.output(IMPRESSIONS_STREAM_ARN_OUTPUT).unwrap(),
                    t.output(CLICKS_STREAM_ARN_OUTPUT).unwrap(),
                    t.output(JOINED_STREAM_ARN_OUTPUT).unwrap()
                ]
                .contains(&arn),
                "{file}: {arn}"
            );
            assert_eq!(r["awsRegion"], "us-east-1");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `adpipe --stack S status` on a stack with a skipped batch, dead letters and a landed batch:
/// the queue depth, the dead letters and the tables' commits (no CloudWatch data here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_queue_dead_letters_and_last_commits() {
    let (s, t) = resolved().await;
    let sqs = aws_sdk_sqs::Client::new(&s.sdk);
    sqs.send_message()
        .queue_url(&t.on_failure_queue_url)
        .message_body(r#"{"KinesisBatchInfo":{}}"#)
        .send()
        .await
        .unwrap();
    // The enricher, configured for the stack, lands the joined fixture rendered for it; its
    // malformed record is dead-lettered.
    let env = env_of(&t);
    let config = EnricherConfig::from_lookup(|k| env.get(k).cloned()).unwrap();
    let local = LocalAws::shared();
    let mut lake = adpipe_enricher::lake_config(
        &config,
        Some(local.endpoint.clone()),
        Some("us-east-1".into()),
    );
    lake.credentials = Some(("test".into(), "test".into()));
    let clients = local.clients().await;
    let enricher =
        adpipe_enricher::aws_enricher(&clients, config.clone(), lake, "stack-test".into())
            .await
            .unwrap();
    let joined = adpipe_local::events::FIXTURES
        .iter()
        .find(|(n, _)| *n == "joined.json")
        .unwrap();
    let rendered = adpipe_local::events::render(joined.0, joined.1, &stage_names(&t)).unwrap();
    let event: adpipe_lambda::KinesisBatch = serde_json::from_str(&rendered).unwrap();
    let (response, report) =
        adpipe_enricher::handle(&enricher, "adpipe", &event, adpipe_lambda::now_ms()).await;
    assert!(
        response.batch_item_failures.is_empty(),
        "{:?}",
        report.failed
    );
    assert!(report.counts.rejected_total() >= 1);

    let status = adpipe_local::status::stack(&s.sdk, &t, Some(("test".into(), "test".into())))
        .await
        .unwrap();
    assert_eq!(status.on_failure_messages, 1);
    assert_eq!(
        status.dead_letters_listed as u64,
        report.counts.rejected_total()
    );
    assert_eq!(status.dead_letters_last_hour, status.dead_letters_listed);
    assert!(!status.dead_letters_capped);
    assert_eq!(status.commits.len(), 2);
    for (table, commits) in &status.commits {
        let commits = commits.as_ref().unwrap();
        assert_eq!(commits.len(), 1, "{table}: one batch, one commit");
        let rows = if table.ends_with("enriched_clicks") {
            report.clicks.rows_written
        } else {
            report.impressions.rows_written
        };
        assert_eq!(commits[0].added_records, Some(rows), "{table}");
        assert_eq!(commits[0].operation, "append");
        assert!(commits[0].input_shard.is_some());
    }
    let text = adpipe_local::status::render(&status);
    assert!(text.contains("1 waiting"), "{text}");
    assert!(text.contains("iterator age, joiner: no data"), "{text}");
}

/// `adpipe --stack S query`: the named queries go to Athena in the stack's workgroup and
/// database, and the results come back as the same tables as DuckDB's. The local endpoint runs
/// no SQL; it answers with the results queued for it, which checks the adapter's paging,
/// header and typing, and which queries it sent.
#[tokio::test]
async fn named_queries_run_through_athena_in_the_stacks_workgroup() {
    use adpipe_local::athena::{AthenaQueries, QueryEngine};
    let (s, t) = resolved().await;
    let files = adpipe_local::lake::named_queries(&workspace_root().join("sql"));
    assert!(files.len() >= 2);
    // One queued result per query: a header row and two rows.
    let results: Vec<serde_json::Value> = files
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let cell = |v: &str| serde_json::json!({"VarCharValue": v});
            serde_json::json!({
                "rows": [
                    {"Data": [cell("campaign_id"), cell("clicks"), cell("ctr")]},
                    {"Data": [cell(&format!("camp-{i}")), cell("12"), cell("0.25")]},
                    {"Data": [cell("camp-x"), cell("0"), {}]},
                ],
                "column_info": [
                    {"Name": "campaign_id", "Type": "varchar"},
                    {"Name": "clicks", "Type": "bigint"},
                    {"Name": "ctr", "Type": "double"},
                ],
            })
        })
        .collect();
    let local = LocalAws::shared();
    let queued = reqwest::Client::new()
        .post(format!(
            "{}/moto-api/static/athena/query-results",
            local.endpoint
        ))
        .header("content-type", "application/json")
        .body(serde_json::json!({"region": "us-east-1", "results": results}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status().as_u16(), 201);
    let athena = aws_sdk_athena::Client::new(&s.sdk);
    // The template's AthenaWorkGroup; Athena refuses a query in a workgroup that does not exist.
    athena
        .create_work_group()
        .name(t.output(WORKGROUP_OUTPUT).unwrap())
        .send()
        .await
        .unwrap();
    let engine = AthenaQueries {
        client: athena.clone(),
        workgroup: t.output(WORKGROUP_OUTPUT).unwrap().to_owned(),
        database: t.output(GLUE_DATABASE_OUTPUT).unwrap().to_owned(),
        timeout: Duration::from_secs(30),
    };
    let got = engine.query(&files).await.unwrap();
    assert_eq!(got.len(), files.len());
    for (i, (r, f)) in got.iter().zip(&files).enumerate() {
        assert_eq!(r.name, f.file_name().unwrap().to_string_lossy());
        assert_eq!(r.columns, ["campaign_id", "clicks", "ctr"]);
        assert_eq!(
            r.rows,
            vec![
                vec![
                    serde_json::json!(format!("camp-{i}")),
                    serde_json::json!(12),
                    serde_json::json!(0.25)
                ],
                vec![
                    serde_json::json!("camp-x"),
                    serde_json::json!(0),
                    serde_json::Value::Null
                ],
            ],
            "{}",
            r.name
        );
    }
    // What Athena was asked: each file's SQL, in the stack's workgroup and database.
    let ids = athena
        .list_query_executions()
        .work_group(t.output(WORKGROUP_OUTPUT).unwrap())
        .send()
        .await
        .unwrap()
        .query_execution_ids()
        .to_vec();
    let mut sent = Vec::new();
    for id in ids {
        let e = athena
            .get_query_execution()
            .query_execution_id(id)
            .send()
            .await
            .unwrap();
        let q = e.query_execution().unwrap();
        if q.work_group() == Some(t.output(WORKGROUP_OUTPUT).unwrap()) {
            assert_eq!(
                q.query_execution_context().and_then(|c| c.database()),
                Some(t.output(GLUE_DATABASE_OUTPUT).unwrap())
            );
            sent.push(q.query().unwrap_or_default().to_owned());
        }
    }
    let mut want: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    sent.sort();
    want.sort();
    assert_eq!(sent, want);
}

/// `adpipe --stack S empty-buckets`: every version and delete marker of a versioned bucket is
/// counted, then deleted, so CloudFormation can delete the bucket with the stack.
#[tokio::test]
async fn empty_buckets_leaves_no_version_and_no_delete_marker() {
    let (s, t) = resolved().await;
    let s3 = aws_sdk_s3::Client::new(&s.sdk);
    let bucket = t.output(LAKE_BUCKET_OUTPUT).unwrap().to_owned();
    s3.put_bucket_versioning()
        .bucket(&bucket)
        .versioning_configuration(
            aws_sdk_s3::types::VersioningConfiguration::builder()
                .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
    // 1,203 keys (more than one DeleteObjects request), one overwritten (two versions), one
    // deleted (a version and a delete marker).
    for i in 0..1_203 {
        let key = format!("lake/t/data/{i:05}.parquet");
        s3.put_object()
            .bucket(&bucket)
            .key(&key)
            .body(vec![1u8].into())
            .send()
            .await
            .unwrap();
    }
    s3.put_object()
        .bucket(&bucket)
        .key("lake/t/data/00000.parquet")
        .body(vec![2u8].into())
        .send()
        .await
        .unwrap();
    s3.delete_object()
        .bucket(&bucket)
        .key("lake/t/data/00001.parquet")
        .send()
        .await
        .unwrap();

    assert_eq!(t.disposable_buckets().unwrap(), vec![bucket.clone()]);
    let counted = empty_bucket(&s3, &bucket, true).await.unwrap();
    assert_eq!(counted, 1_205);
    assert_eq!(empty_bucket(&s3, &bucket, false).await.unwrap(), 1_205);
    let left = s3
        .list_object_versions()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert!(left.versions().is_empty() && left.delete_markers().is_empty());
    // Empty, the bucket can be deleted (what CloudFormation does next).
    s3.delete_bucket().bucket(&bucket).send().await.unwrap();
}
