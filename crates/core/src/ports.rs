//! Ports: the capabilities the joiner needs from the outside world, in domain types only.
//! AWS adapters live in `adpipe-aws`; in-memory ones in [`crate::in_memory`].

use std::future::Future;

use crate::join::buckets::BucketRange;
use crate::join::state::{Blob, PutSlot, Slot};

/// A failure reported by an adapter. Every variant fails the record that needed it, so Lambda
/// redelivers it; `retryable` says whether trying again can help (for logs and alarms).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// The service throttled us (e.g. DynamoDB `ProvisionedThroughputExceededException`)
    /// after the SDK's own retries.
    #[error("throttled: {0}")]
    Throttled(String),
    /// Network trouble, timeouts, 5xx.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// The service refused the request as malformed or forbidden; retrying will not help.
    #[error("request rejected: {0}")]
    Rejected(String),
    /// Stored state could not be read back (a schema or encoding bug).
    #[error("corrupt state: {0}")]
    Corrupt(String),
}

impl PortError {
    pub fn retryable(&self) -> bool {
        matches!(self, PortError::Throttled(_) | PortError::Unavailable(_))
    }
}

/// One record for an output stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub partition_key: String,
    pub data: Vec<u8>,
    /// Kinesis' `ExplicitHashKey` (a decimal in 0..2^128): places the record on the shard
    /// owning that hash instead of the partition key's MD5. The router uses it so a whole
    /// state bucket maps to exactly one shard.
    pub explicit_hash_key: Option<String>,
}

/// The per-entry result of a multi-record put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryResult {
    Accepted,
    Failed { code: String, message: String },
}

/// An output stream.
pub trait RecordSink: Send + Sync {
    /// Sends one request of at most [`crate::join::emit::MAX_RECORDS_PER_PUT`] records and
    /// [`crate::join::emit::MAX_BYTES_PER_PUT`] bytes. `Ok` holds one result per record, in order.
    fn put_records(
        &self,
        records: &[OutRecord],
    ) -> impl Future<Output = Result<Vec<EntryResult>, PortError>> + Send;
}

/// An object written to the dead-letter (or late/orphan) destination. The key is derived from
/// the record's identity, so writing it again after a retry overwrites, never adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub key: String,
    pub body: Vec<u8>,
}

/// The dead-letter destination.
pub trait DeadLetterSink: Send + Sync {
    fn put(&self, letter: &DeadLetter) -> impl Future<Output = Result<(), PortError>> + Send;
}

/// The log store (DynamoDB in production, [`crate::in_memory::MemoryStateLog`] in tests).
pub trait StateLog: Send + Sync {
    /// Every slot of `log` numbered `from` or more, in order.
    fn read(
        &self,
        log: &str,
        from: u64,
    ) -> impl Future<Output = Result<Vec<Slot>, PortError>> + Send;
    /// Writes the slot only if that number is absent in `log`.
    fn put(
        &self,
        log: &str,
        slot: &Slot,
    ) -> impl Future<Output = Result<PutSlot, PortError>> + Send;
    /// Every log id ever registered (one per bucket range a shard has owned).
    fn logs(&self) -> impl Future<Output = Result<Vec<String>, PortError>> + Send;
    /// Registers a log id (idempotent).
    fn register(&self, log: &str) -> impl Future<Output = Result<(), PortError>> + Send;
    /// Records that every output of `log`'s slots up to `n` is on the joined stream.
    fn ack(&self, log: &str, n: u64) -> impl Future<Output = Result<(), PortError>> + Send;
    /// The latest [`StateLog::ack`] of `log`.
    fn acked(&self, log: &str) -> impl Future<Output = Result<Option<u64>, PortError>> + Send;
    /// The newest slot of `log`, if any.
    fn last(&self, log: &str) -> impl Future<Output = Result<Option<Slot>, PortError>> + Send;
    /// Writes a blob (a cold page, a ledger item); its key is unique to its writer.
    fn put_blob(&self, blob: &Blob) -> impl Future<Output = Result<(), PortError>> + Send;
    /// Every blob of partition `pk` with a key in `lo..=hi`, in key order (strongly
    /// consistent).
    fn blobs(
        &self,
        pk: &str,
        lo: u128,
        hi: u128,
    ) -> impl Future<Output = Result<Vec<Blob>, PortError>> + Send;
}

/// Which bucket range a keyed-stream shard owns (Kinesis `ListShards` in production).
pub trait ShardRanges: Send + Sync {
    fn range(
        &self,
        stream: &str,
        shard: &str,
    ) -> impl Future<Output = Result<BucketRange, PortError>> + Send;
}

impl<T: StateLog> StateLog for std::sync::Arc<T> {
    fn read(
        &self,
        log: &str,
        from: u64,
    ) -> impl Future<Output = Result<Vec<Slot>, PortError>> + Send {
        (**self).read(log, from)
    }
    fn put(
        &self,
        log: &str,
        slot: &Slot,
    ) -> impl Future<Output = Result<PutSlot, PortError>> + Send {
        (**self).put(log, slot)
    }
    fn logs(&self) -> impl Future<Output = Result<Vec<String>, PortError>> + Send {
        (**self).logs()
    }
    fn register(&self, log: &str) -> impl Future<Output = Result<(), PortError>> + Send {
        (**self).register(log)
    }
    fn ack(&self, log: &str, n: u64) -> impl Future<Output = Result<(), PortError>> + Send {
        (**self).ack(log, n)
    }
    fn acked(&self, log: &str) -> impl Future<Output = Result<Option<u64>, PortError>> + Send {
        (**self).acked(log)
    }
    fn last(&self, log: &str) -> impl Future<Output = Result<Option<Slot>, PortError>> + Send {
        (**self).last(log)
    }
    fn put_blob(&self, blob: &Blob) -> impl Future<Output = Result<(), PortError>> + Send {
        (**self).put_blob(blob)
    }
    fn blobs(
        &self,
        pk: &str,
        lo: u128,
        hi: u128,
    ) -> impl Future<Output = Result<Vec<Blob>, PortError>> + Send {
        (**self).blobs(pk, lo, hi)
    }
}

/// Which lake table a batch of rows goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LakeTable {
    Clicks,
    Impressions,
}

/// The Kinesis input a lake commit covers: one shard's records `first..=last`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRange {
    pub stream: String,
    pub shard: String,
    pub first_sequence: String,
    pub last_sequence: String,
}

impl InputRange {
    /// A stable id for exactly this range: data files are named after it and each commit
    /// records it, so a retried batch rewrites the same objects and is never appended twice.
    pub fn batch_id(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [
            &self.stream,
            &self.shard,
            &self.first_sequence,
            &self.last_sequence,
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        let digest: String = h.finalize()[..10]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{}-{digest}", crate::dead_letter::key_segment(&self.shard))
    }
}

/// Rows for one table from one input batch.
#[derive(Debug, Clone)]
pub struct LakeAppend {
    pub table: LakeTable,
    pub input: InputRange,
    pub rows: arrow_array::RecordBatch,
    /// Per row: its dedup key (`(impression_id, click_id)`, empty click id for impressions).
    pub keys: Vec<(String, String)>,
    /// Per row: the row may already be in the table (a `recovered` record), so it is landed
    /// only if its key is absent.
    pub in_doubt: Vec<bool>,
}

/// What an append did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendReport {
    /// This exact input range was committed before (a retry): nothing was written.
    pub already_committed: bool,
    pub rows_written: u64,
    /// Rows not landed because their key is already in the table.
    pub duplicates_dropped: u64,
    pub files_written: u64,
    pub bytes_written: u64,
    /// Commit attempts beyond the first (conflicts with concurrent writers).
    pub commit_retries: u32,
    /// Columns of the table this version does not write (another writer's): null in every
    /// row written.
    pub foreign_columns: u64,
    /// Previous metadata files the commit deleted.
    pub metadata_deleted: u64,
    /// Snapshots the commit expired before their age, to keep the table's snapshot cap.
    pub snapshots_expired_early: u64,
}

/// A lake table that appends idempotently per input range.
pub trait TableWriter: Send + Sync {
    fn append(
        &self,
        append: LakeAppend,
    ) -> impl Future<Output = Result<AppendReport, PortError>> + Send;
}

impl<T: RecordSink> RecordSink for std::sync::Arc<T> {
    fn put_records(
        &self,
        records: &[OutRecord],
    ) -> impl Future<Output = Result<Vec<EntryResult>, PortError>> + Send {
        (**self).put_records(records)
    }
}

impl<T: DeadLetterSink> DeadLetterSink for std::sync::Arc<T> {
    fn put(&self, letter: &DeadLetter) -> impl Future<Output = Result<(), PortError>> + Send {
        (**self).put(letter)
    }
}
