//! `DynamoDbStateLog`: the keyed joiner's log slots in a DynamoDB table with key `pk` (S) and
//! `sk` (N), and TTL on `ttl`.
//!
//! - slot `n` of log `r0000-0063`: `pk = "log#r0000-0063"`, `sk = n`, `d` (B) the compressed
//!   body, `ttl` (N) epoch seconds;
//! - the directory of logs: `pk = "dir"`, `sk = 0`, `logs` (SS);
//! - a log's acknowledgement: `pk = "ack#r0000-0063"`, `sk = 0`, `n` (N), the last slot whose
//!   outputs are all on the joined stream (written after each fully accepted emission).
//!
//! A slot is written with `PutItem` on the condition `attribute_not_exists(pk)`: of two writers
//! of one slot number exactly one succeeds (the fence). A log is read with strongly consistent
//! `Query` pages, only when an execution environment rebuilds its state.
//!
//! `KinesisShardRanges` finds a keyed-stream shard's bucket range from `ListShards`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use adpipe_core::keyed::BucketRange;
use adpipe_core::packed::{PutSlot, ShardRanges, Slot, StateLog};
use adpipe_core::ports::PortError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;

use crate::dynamodb::item_size;
use crate::error::port_error;

/// Partition key attribute.
pub const PK: &str = "pk";
/// Sort key attribute (N).
pub const SK: &str = "sk";
/// Slot body attribute (B).
pub const BODY: &str = "d";
/// TTL attribute.
pub const TTL: &str = "ttl";
/// Directory attribute (SS).
pub const LOGS: &str = "logs";
/// Acknowledgement attribute (N): outputs of slots up to it are on the joined stream.
pub const ACKED: &str = "n";
const DIRECTORY: &str = "dir";

/// Requests and capacity units the log spent, by DynamoDB's rules computed from the real item
/// sizes (local endpoints do not report capacity): a put is its item size in 1 KB units; a
/// strongly consistent query page is its items' total size in 4 KB units.
#[derive(Debug, Default)]
pub struct LogUsage {
    pub requests: AtomicU64,
    pub write_units: AtomicU64,
    pub read_units: AtomicU64,
    pub write_bytes: AtomicU64,
}

impl LogUsage {
    fn add(&self, requests: u64, write_units: u64, read_units: u64) {
        self.requests.fetch_add(requests, Ordering::Relaxed);
        self.write_units.fetch_add(write_units, Ordering::Relaxed);
        self.read_units.fetch_add(read_units, Ordering::Relaxed);
    }
}

/// The join state's log in DynamoDB.
#[derive(Debug)]
pub struct DynamoDbStateLog {
    client: aws_sdk_dynamodb::Client,
    table: String,
    pub usage: LogUsage,
}

impl DynamoDbStateLog {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        DynamoDbStateLog {
            client,
            table: table.into(),
            usage: LogUsage::default(),
        }
    }
}

fn log_key(log: &str) -> AttributeValue {
    AttributeValue::S(format!("log#{log}"))
}

fn slot_of(item: &HashMap<String, AttributeValue>) -> Result<Slot, PortError> {
    let n = item
        .get(SK)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| PortError::Corrupt("log slot without a numeric sk".into()))?;
    let body = item
        .get(BODY)
        .and_then(|v| v.as_b().ok())
        .ok_or_else(|| PortError::Corrupt(format!("log slot {n} without a body")))?
        .as_ref()
        .to_vec();
    let ttl_epoch_s = item
        .get(TTL)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(Slot {
        n,
        body,
        ttl_epoch_s,
    })
}

impl StateLog for DynamoDbStateLog {
    async fn read(&self, log: &str, from: u64) -> Result<Vec<Slot>, PortError> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :pk AND #sk >= :from")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sk", SK)
                .expression_attribute_values(":pk", log_key(log))
                .expression_attribute_values(":from", AttributeValue::N(from.to_string()))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| port_error("Query", e))?;
            let items = page.items();
            let bytes: usize = items.iter().map(item_size).sum();
            self.usage.add(1, 0, bytes.div_ceil(4096).max(1) as u64);
            for item in items {
                out.push(slot_of(item)?);
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn put(&self, log: &str, slot: &Slot) -> Result<PutSlot, PortError> {
        let item: HashMap<String, AttributeValue> = [
            (PK.to_owned(), log_key(log)),
            (SK.to_owned(), AttributeValue::N(slot.n.to_string())),
            (
                BODY.to_owned(),
                AttributeValue::B(Blob::new(slot.body.clone())),
            ),
            (
                TTL.to_owned(),
                AttributeValue::N(slot.ttl_epoch_s.to_string()),
            ),
        ]
        .into_iter()
        .collect();
        let size = item_size(&item);
        self.usage
            .write_bytes
            .fetch_add(size as u64, Ordering::Relaxed);
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .send()
            .await;
        self.usage.add(1, size.div_ceil(1024).max(1) as u64, 0);
        match result {
            Ok(_) => Ok(PutSlot::Written),
            Err(e) => {
                if matches!(
                    e.as_service_error(),
                    Some(PutItemError::ConditionalCheckFailedException(_))
                ) {
                    Ok(PutSlot::Taken)
                } else {
                    Err(port_error("PutItem", e))
                }
            }
        }
    }

    async fn logs(&self) -> Result<Vec<String>, PortError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(PK, AttributeValue::S(DIRECTORY.into()))
            .key(SK, AttributeValue::N("0".into()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| port_error("GetItem", e))?;
        let size = out.item().map(item_size).unwrap_or(0);
        self.usage.add(1, 0, size.div_ceil(4096).max(1) as u64);
        Ok(out
            .item()
            .and_then(|i| i.get(LOGS))
            .and_then(|v| v.as_ss().ok())
            .cloned()
            .unwrap_or_default())
    }

    async fn register(&self, log: &str) -> Result<(), PortError> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key(PK, AttributeValue::S(DIRECTORY.into()))
            .key(SK, AttributeValue::N("0".into()))
            .update_expression("ADD #logs :log")
            .expression_attribute_names("#logs", LOGS)
            .expression_attribute_values(":log", AttributeValue::Ss(vec![log.to_owned()]))
            .send()
            .await
            .map_err(|e| port_error("UpdateItem", e))?;
        self.usage.add(1, 1, 0);
        Ok(())
    }

    async fn ack(&self, log: &str, n: u64) -> Result<(), PortError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item(PK, AttributeValue::S(format!("ack#{log}")))
            .item(SK, AttributeValue::N("0".into()))
            .item(ACKED, AttributeValue::N(n.to_string()))
            .send()
            .await
            .map_err(|e| port_error("PutItem", e))?;
        self.usage.add(1, 1, 0);
        Ok(())
    }

    async fn acked(&self, log: &str) -> Result<Option<u64>, PortError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(PK, AttributeValue::S(format!("ack#{log}")))
            .key(SK, AttributeValue::N("0".into()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| port_error("GetItem", e))?;
        self.usage.add(1, 0, 1);
        Ok(out
            .item()
            .and_then(|i| i.get(ACKED))
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok()))
    }
}

/// A keyed-stream shard's bucket range, from its `HashKeyRange` in `ListShards`.
#[derive(Debug, Clone)]
pub struct KinesisShardRanges {
    client: aws_sdk_kinesis::Client,
}

impl KinesisShardRanges {
    pub fn new(client: aws_sdk_kinesis::Client) -> Self {
        KinesisShardRanges { client }
    }
}

impl ShardRanges for KinesisShardRanges {
    async fn range(&self, stream: &str, shard: &str) -> Result<BucketRange, PortError> {
        let mut token: Option<String> = None;
        loop {
            let mut request = self.client.list_shards();
            request = match token.take() {
                Some(t) => request.next_token(t),
                None => request.stream_name(stream),
            };
            let out = request
                .send()
                .await
                .map_err(|e| port_error("ListShards", e))?;
            for s in out.shards() {
                if s.shard_id() == shard {
                    let range = s.hash_key_range().ok_or_else(|| {
                        PortError::Corrupt(format!("shard {shard} has no hash key range"))
                    })?;
                    return BucketRange::from_hash_range(
                        range.starting_hash_key(),
                        range.ending_hash_key(),
                    )
                    .ok_or_else(|| {
                        PortError::Rejected(format!(
                            "shard {shard} owns no state bucket: the keyed stream has more shards than the {} buckets",
                            adpipe_core::keyed::HASH_BUCKETS
                        ))
                    });
                }
            }
            match out.next_token() {
                Some(t) => token = Some(t.to_owned()),
                None => {
                    return Err(PortError::Unavailable(format!(
                        "shard {shard} is not listed for stream {stream}"
                    )))
                }
            }
        }
    }
}
