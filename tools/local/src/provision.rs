//! Creates the pipeline's resources on the local endpoint, as `template.yaml` does in the
//! cloud: the four streams, the join state log and commit-lease tables (TTL on `ttl`), the
//! lake bucket (which also holds the dead letters) and the mappings' on-failure queue.
//! Idempotent: what exists is left alone. The Glue database and the Iceberg tables are created
//! by the enricher at start-up (`ensure_tables`).

use std::time::Duration;

use adpipe_aws::Clients;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TimeToLiveSpecification,
};

use crate::resources::{Resources, StreamSpec};
use crate::LocalError;

/// What provisioning did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Provisioned {
    pub created: Vec<String>,
    pub existing: Vec<String>,
}

/// Creates every resource that does not exist yet.
pub async fn provision(
    clients: &Clients,
    sqs: &aws_sdk_sqs::Client,
    r: &Resources,
) -> Result<Provisioned, LocalError> {
    let mut out = Provisioned::default();
    for stream in [
        &r.impressions_stream,
        &r.clicks_stream,
        &r.joined_stream,
        &r.keyed_stream,
    ] {
        let label = format!("stream {}", stream.name);
        if create_stream(clients, stream).await? {
            out.created.push(label);
        } else {
            out.existing.push(label);
        }
    }
    for (table, sorted) in [(&r.state_log_table, true), (&r.commit_lease_table, false)] {
        let label = format!("table {table}");
        if create_ttl_table(clients, table, sorted).await? {
            out.created.push(label);
        } else {
            out.existing.push(label);
        }
    }
    let mut buckets = vec![&r.lake_bucket, &r.dead_letter_bucket];
    buckets.dedup();
    for bucket in buckets {
        let label = format!("bucket {bucket}");
        if create_bucket(clients, bucket).await? {
            out.created.push(label);
        } else {
            out.existing.push(label);
        }
    }
    let label = format!("queue {}", r.on_failure_queue);
    if create_queue(sqs, &r.on_failure_queue).await? {
        out.created.push(label);
    } else {
        out.existing.push(label);
    }
    tracing::info!(
        created = out.created.len(),
        existing = out.existing.len(),
        "resources provisioned"
    );
    Ok(out)
}

/// Creates a stream and waits until it is active. `Ok(false)`: it existed.
pub async fn create_stream(clients: &Clients, spec: &StreamSpec) -> Result<bool, LocalError> {
    let created = match clients
        .kinesis
        .create_stream()
        .stream_name(&spec.name)
        .shard_count(spec.shards)
        .send()
        .await
    {
        Ok(_) => true,
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_in_use_exception()) =>
        {
            false
        }
        Err(e) => return Err(LocalError::aws("Kinesis CreateStream", e)),
    };
    for _ in 0..300 {
        let d = clients
            .kinesis
            .describe_stream_summary()
            .stream_name(&spec.name)
            .send()
            .await
            .map_err(|e| LocalError::aws("Kinesis DescribeStreamSummary", e))?;
        if d.stream_description_summary()
            .map(|s| s.stream_status().as_str())
            == Some("ACTIVE")
        {
            return Ok(created);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(LocalError::Endpoint(format!(
        "stream {} did not become active",
        spec.name
    )))
}

/// Creates a table keyed by `pk` (S), and `sk` (N) if `sorted`, on demand, with TTL on `ttl`.
/// `Ok(false)`: it existed.
pub async fn create_ttl_table(
    clients: &Clients,
    name: &str,
    sorted: bool,
) -> Result<bool, LocalError> {
    let mut keys = vec![("pk", KeyType::Hash, ScalarAttributeType::S)];
    if sorted {
        keys.push(("sk", KeyType::Range, ScalarAttributeType::N));
    }
    let mut request = clients.dynamodb.create_table().table_name(name);
    for (attribute, key_type, scalar) in keys {
        request = request
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(attribute)
                    .key_type(key_type)
                    .build()
                    .map_err(|e| LocalError::aws("DynamoDB key schema", e))?,
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(attribute)
                    .attribute_type(scalar)
                    .build()
                    .map_err(|e| LocalError::aws("DynamoDB attribute definition", e))?,
            );
    }
    match request
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
    {
        Ok(_) => {}
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_in_use_exception()) =>
        {
            return Ok(false)
        }
        Err(e) => return Err(LocalError::aws("DynamoDB CreateTable", e)),
    }
    let ttl = TimeToLiveSpecification::builder()
        .attribute_name("ttl")
        .enabled(true)
        .build()
        .map_err(|e| LocalError::aws("DynamoDB TTL specification", e))?;
    clients
        .dynamodb
        .update_time_to_live()
        .table_name(name)
        .time_to_live_specification(ttl)
        .send()
        .await
        .map_err(|e| LocalError::aws("DynamoDB UpdateTimeToLive", e))?;
    Ok(true)
}

/// Creates a bucket. `Ok(false)`: it existed.
pub async fn create_bucket(clients: &Clients, name: &str) -> Result<bool, LocalError> {
    match clients.s3.create_bucket().bucket(name).send().await {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_service_error().is_some_and(|s| {
                s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()
            }) =>
        {
            Ok(false)
        }
        Err(e) => Err(LocalError::aws("S3 CreateBucket", e)),
    }
}

/// Creates a standard SQS queue. `Ok(false)`: it existed (CreateQueue with the same name and
/// attributes is idempotent, so existence is asked first).
pub async fn create_queue(sqs: &aws_sdk_sqs::Client, name: &str) -> Result<bool, LocalError> {
    match sqs.get_queue_url().queue_name(name).send().await {
        Ok(_) => return Ok(false),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_queue_does_not_exist()) => {}
        Err(e) => return Err(LocalError::aws("SQS GetQueueUrl", e)),
    }
    sqs.create_queue()
        .queue_name(name)
        .send()
        .await
        .map_err(|e| LocalError::aws("SQS CreateQueue", e))?;
    Ok(true)
}
