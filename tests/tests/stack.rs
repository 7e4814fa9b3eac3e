//! `adpipe --stack NAME`: the names come from the stack's CloudFormation outputs, and generate,
//! replay and redrive act on that stack's streams and queue. The stack is created on the local
//! endpoint (which serves CloudFormation) from a template with `template.yaml`'s output keys.

use std::sync::Arc;
use std::time::Duration;

use adpipe_it::{read_stream, unique, workspace_root, LocalAws};
use adpipe_local::generator::{generate, TrafficConfig};
use adpipe_local::progress::Counter;
use adpipe_local::redrive::redrive;
use adpipe_local::replay::{send_rated, Order};
use adpipe_local::stack::{
    StackTarget, CLICKS_STREAM_OUTPUT, IMPRESSIONS_STREAM_OUTPUT, JOINED_STREAM_OUTPUT,
    ON_FAILURE_QUEUE_OUTPUT,
};
use aws_sdk_kinesis::types::ShardIteratorType;

/// A stack with the streams and queue the commands use, and `template.yaml`'s output keys.
fn template(prefix: &str) -> String {
    let stream = |name: &str| {
        serde_json::json!({"Type": "AWS::Kinesis::Stream",
            "Properties": {"Name": format!("{prefix}-{name}"), "ShardCount": 1}})
    };
    serde_json::json!({
        "AWSTemplateFormatVersion": "2010-09-09",
        "Resources": {
            "ImpressionsStream": stream("impressions"),
            "ClicksStream": stream("clicks"),
            "JoinedStream": stream("joined"),
            "OnFailureQueue": {"Type": "AWS::SQS::Queue",
                "Properties": {"QueueName": format!("{prefix}-on-failure")}},
        },
        "Outputs": {
            IMPRESSIONS_STREAM_OUTPUT: {"Value": {"Ref": "ImpressionsStream"}},
            CLICKS_STREAM_OUTPUT: {"Value": {"Ref": "ClicksStream"}},
            JOINED_STREAM_OUTPUT: {"Value": {"Ref": "JoinedStream"}},
            ON_FAILURE_QUEUE_OUTPUT: {"Value": {"Ref": "OnFailureQueue"}},
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
