//! `DynamoDbStateLog`: the keyed joiner's log slots in a DynamoDB table with key `pk` (S) and
//! `sk` (N), and TTL on `ttl`.
//!
//! - slot `n` of log `r0000-0063`: `pk = "log#r0000-0063"`, `sk = n`, `d` (B) the compressed
//!   body, `ttl` (N) epoch seconds;
//! - the directory of logs: `pk = "dir"`, `sk = 0`, `logs` (SS);
//! - a log's acknowledgement: `pk = "ack#r0000-0063"`, `sk = 0`, `n` (N), the last slot whose
//!   outputs are all on the joined stream (written after each fully accepted emission);
//! - cold pages, events that left the warm window: `pk = "cold#<bucket>"`, `sk` a number that
//!   orders them by level and event-time window, then writer (see `adpipe_core::packed`), `d`,
//!   `ttl`;
//! - ledger items, evicted clicks still waiting for a partner: `pk = "orph#<log>"`, `sk` the
//!   eviction time then writer, `d`, `ttl`.
//!
//! A slot is written with `PutItem` on the condition `attribute_not_exists(pk)`: of two writers
//! of one slot number exactly one succeeds (the fence). A log is read with strongly consistent
//! `Query` pages, only when an execution environment rebuilds its state.
//!
//! `KinesisShardRanges` finds a keyed-stream shard's bucket range from `ListShards`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use adpipe_core::join::buckets::BucketRange;
use adpipe_core::join::state::{PutSlot, Slot};
use adpipe_core::ports::PortError;
use adpipe_core::ports::{ShardRanges, StateLog};
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;

use crate::error::port_error;
use crate::item_size::item_size;

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

impl DynamoDbStateLog {
    /// An item of a key, a compressed body and a TTL, and its size (counted as written).
    fn body_item(
        &self,
        pk: AttributeValue,
        sk: String,
        body: &[u8],
        ttl_epoch_s: i64,
    ) -> (HashMap<String, AttributeValue>, usize) {
        let item: HashMap<String, AttributeValue> = [
            (PK.to_owned(), pk),
            (SK.to_owned(), AttributeValue::N(sk)),
            (BODY.to_owned(), AttributeValue::B(Blob::new(body.to_vec()))),
            (TTL.to_owned(), AttributeValue::N(ttl_epoch_s.to_string())),
        ]
        .into_iter()
        .collect();
        let size = item_size(&item);
        self.usage
            .write_bytes
            .fetch_add(size as u64, Ordering::Relaxed);
        (item, size)
    }

    /// Every item a strongly consistent `Query` finds, page after page.
    async fn query_all(
        &self,
        condition: &str,
        values: Vec<(&str, AttributeValue)>,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, PortError> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let mut query = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression(condition)
                .expression_attribute_names("#pk", PK)
                .consistent_read(true)
                .set_exclusive_start_key(start.take());
            if condition.contains("#sk") {
                query = query.expression_attribute_names("#sk", SK);
            }
            for (name, value) in &values {
                query = query.expression_attribute_values(*name, value.clone());
            }
            let page = query.send().await.map_err(|e| port_error("Query", e))?;
            let items = page.items();
            let bytes: usize = items.iter().map(item_size).sum();
            self.usage.add(1, 0, bytes.div_ceil(4096).max(1) as u64);
            out.extend(items.iter().cloned());
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        Ok(out)
    }
}

fn log_key(log: &str) -> AttributeValue {
    AttributeValue::S(format!("log#{log}"))
}

/// An item's numeric sort key, compressed body and TTL.
fn parts_of(
    item: &HashMap<String, AttributeValue>,
    what: &str,
) -> Result<(u128, Vec<u8>, i64), PortError> {
    let sk = item
        .get(SK)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse::<u128>().ok())
        .ok_or_else(|| PortError::Corrupt(format!("{what} without a numeric sk")))?;
    let body = item
        .get(BODY)
        .and_then(|v| v.as_b().ok())
        .ok_or_else(|| PortError::Corrupt(format!("{what} {sk} without a body")))?
        .as_ref()
        .to_vec();
    let ttl_epoch_s = item
        .get(TTL)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok((sk, body, ttl_epoch_s))
}

fn slot_of(item: &HashMap<String, AttributeValue>) -> Result<Slot, PortError> {
    let (sk, body, ttl_epoch_s) = parts_of(item, "log slot")?;
    let n = u64::try_from(sk)
        .map_err(|_| PortError::Corrupt(format!("log slot number {sk} out of range")))?;
    Ok(Slot {
        n,
        body,
        ttl_epoch_s,
    })
}

impl StateLog for DynamoDbStateLog {
    async fn read(&self, log: &str, from: u64) -> Result<Vec<Slot>, PortError> {
        self.query_all(
            "#pk = :pk AND #sk >= :from",
            vec![
                (":pk", log_key(log)),
                (":from", AttributeValue::N(from.to_string())),
            ],
        )
        .await?
        .iter()
        .map(slot_of)
        .collect()
    }

    async fn put(&self, log: &str, slot: &Slot) -> Result<PutSlot, PortError> {
        let (item, size) = self.body_item(
            log_key(log),
            slot.n.to_string(),
            &slot.body,
            slot.ttl_epoch_s,
        );
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

    async fn last(&self, log: &str) -> Result<Option<Slot>, PortError> {
        let page = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("#pk = :pk")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_values(":pk", log_key(log))
            .scan_index_forward(false)
            .limit(1)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| port_error("Query", e))?;
        let bytes: usize = page.items().iter().map(item_size).sum();
        self.usage.add(1, 0, bytes.div_ceil(4096).max(1) as u64);
        page.items().first().map(slot_of).transpose()
    }

    async fn put_blob(&self, blob: &adpipe_core::join::state::Blob) -> Result<(), PortError> {
        let (item, size) = self.body_item(
            AttributeValue::S(blob.pk.clone()),
            blob.sk.to_string(),
            &blob.body,
            blob.ttl_epoch_s,
        );
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| port_error("PutItem", e))?;
        self.usage.add(1, size.div_ceil(1024).max(1) as u64, 0);
        Ok(())
    }

    async fn blobs(
        &self,
        pk: &str,
        lo: u128,
        hi: u128,
    ) -> Result<Vec<adpipe_core::join::state::Blob>, PortError> {
        let items = self
            .query_all(
                "#pk = :pk AND #sk BETWEEN :lo AND :hi",
                vec![
                    (":pk", AttributeValue::S(pk.to_owned())),
                    (":lo", AttributeValue::N(lo.to_string())),
                    (":hi", AttributeValue::N(hi.to_string())),
                ],
            )
            .await?;
        let mut out = Vec::new();
        for item in &items {
            let (sk, body, ttl_epoch_s) = parts_of(item, pk)?;
            out.push(adpipe_core::join::state::Blob {
                pk: pk.to_owned(),
                sk,
                body,
                ttl_epoch_s,
            });
        }
        Ok(out)
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
                            adpipe_core::join::buckets::HASH_BUCKETS
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
