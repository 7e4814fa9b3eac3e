//! In-memory adapters of the ports, beside each other, with the same semantics as the AWS
//! adapters where it matters: for property tests with many cases, benchmarks, and fault
//! injection around the real adapters.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::join::buckets::BucketRange;
use crate::join::state::{
    blob_item_size, slot_item_size, Blob, PutSlot, Slot, DYNAMODB_ITEM_LIMIT,
};
use crate::ports::{
    DeadLetter, DeadLetterSink, EntryResult, OutRecord, PortError, RecordSink, ShardRanges,
    StateLog,
};

/// An output stream that keeps what it accepted, in order.
#[derive(Debug, Default)]
pub struct MemoryRecordSink {
    records: Mutex<Vec<OutRecord>>,
}

impl MemoryRecordSink {
    pub fn records(&self) -> Vec<OutRecord> {
        lock(&self.records).clone()
    }
}

impl RecordSink for MemoryRecordSink {
    async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<EntryResult>, PortError> {
        lock(&self.records).extend_from_slice(records);
        Ok(vec![EntryResult::Accepted; records.len()])
    }
}

/// A dead-letter destination keyed like S3: a second put of a key overwrites the first.
#[derive(Debug, Default)]
pub struct MemoryDeadLetterSink {
    letters: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl MemoryDeadLetterSink {
    pub fn letters(&self) -> BTreeMap<String, Vec<u8>> {
        lock(&self.letters).clone()
    }
}

impl DeadLetterSink for MemoryDeadLetterSink {
    async fn put(&self, letter: &DeadLetter) -> Result<(), PortError> {
        lock(&self.letters).insert(letter.key.clone(), letter.body.clone());
        Ok(())
    }
}

/// An in-memory log with DynamoDB's behaviour where it matters: a slot over the item limit is
/// refused, a conditional put on a taken number writes nothing, and slots past their TTL are
/// deleted when [`MemoryStateLog::expire`] runs (as DynamoDB does, some time after the TTL).
#[derive(Debug, Default)]
pub struct MemoryStateLog {
    slots: std::sync::Mutex<BTreeMap<(String, u64), Slot>>,
    blobs: std::sync::Mutex<BTreeMap<(String, u128), Blob>>,
    logs: std::sync::Mutex<BTreeSet<String>>,
    acks: std::sync::Mutex<BTreeMap<String, u64>>,
    requests: std::sync::atomic::AtomicU64,
    write_units: std::sync::atomic::AtomicU64,
    read_units_x2: std::sync::atomic::AtomicU64,
    writes_by_kind: std::sync::Mutex<BTreeMap<&'static str, KindWrites>>,
}

/// Writes of one kind of item: how many, their bytes and write units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindWrites {
    pub items: u64,
    pub bytes: u64,
    pub units: u64,
}

impl MemoryStateLog {
    /// Deletes every slot whose TTL is before `now_epoch_s`.
    pub fn expire(&self, now_epoch_s: i64) {
        lock(&self.slots).retain(|_, s| s.ttl_epoch_s >= now_epoch_s);
        lock(&self.blobs).retain(|_, b| b.ttl_epoch_s >= now_epoch_s);
    }

    /// How many cold pages and ledger items are stored.
    pub fn blob_count(&self) -> usize {
        lock(&self.blobs).len()
    }

    pub fn slot_count(&self) -> usize {
        lock(&self.slots).len()
    }

    /// Writes so far by item kind: `slot`, `ack`, `register`, `page` (`cold#`), `ledger`
    /// (`orph#`).
    pub fn writes_by_kind(&self) -> BTreeMap<&'static str, KindWrites> {
        lock(&self.writes_by_kind).clone()
    }

    fn count_write(&self, kind: &'static str, bytes: usize) {
        let units = bytes.div_ceil(1024).max(1) as u64;
        self.write_units
            .fetch_add(units, std::sync::atomic::Ordering::Relaxed);
        let mut by_kind = lock(&self.writes_by_kind);
        let k = by_kind.entry(kind).or_default();
        k.items += 1;
        k.bytes += bytes as u64;
        k.units += units;
    }

    /// Requests, write units and read units (eventually consistent reads) so far.
    pub fn usage(&self) -> (u64, u64, f64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.requests.load(Relaxed),
            self.write_units.load(Relaxed),
            self.read_units_x2.load(Relaxed) as f64 / 2.0,
        )
    }
}

impl StateLog for MemoryStateLog {
    async fn read(&self, log: &str, from: u64) -> Result<Vec<Slot>, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        let slots: Vec<Slot> = lock(&self.slots)
            .range((log.to_owned(), from)..=(log.to_owned(), u64::MAX))
            .map(|(_, s)| s.clone())
            .collect();
        let bytes: usize = slots.iter().map(|s| slot_item_size(log, s)).sum();
        self.requests
            .fetch_add(1 + (bytes / (1024 * 1024)) as u64, Relaxed);
        self.read_units_x2
            .fetch_add(bytes.div_ceil(4096).max(1) as u64, Relaxed);
        Ok(slots)
    }

    async fn put(&self, log: &str, slot: &Slot) -> Result<PutSlot, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        let size = slot_item_size(log, slot);
        if size > DYNAMODB_ITEM_LIMIT {
            return Err(PortError::Rejected(format!(
                "ValidationException: Item size has exceeded the maximum allowed size ({size} bytes)"
            )));
        }
        self.count_write("slot", size);
        let mut slots = lock(&self.slots);
        let key = (log.to_owned(), slot.n);
        if slots.contains_key(&key) {
            return Ok(PutSlot::Taken);
        }
        slots.insert(key, slot.clone());
        Ok(PutSlot::Written)
    }

    async fn logs(&self) -> Result<Vec<String>, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        self.read_units_x2.fetch_add(1, Relaxed);
        Ok(lock(&self.logs).iter().cloned().collect())
    }

    async fn register(&self, log: &str) -> Result<(), PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        self.count_write(
            "register",
            "pk".len() + "logs".len() + "sk".len() + log.len(),
        );
        lock(&self.logs).insert(log.to_owned());
        Ok(())
    }

    async fn ack(&self, log: &str, n: u64) -> Result<(), PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        self.count_write(
            "ack",
            "pk".len() + "ack#".len() + log.len() + "n".len() + 21,
        );
        lock(&self.acks).insert(log.to_owned(), n);
        Ok(())
    }

    async fn acked(&self, log: &str) -> Result<Option<u64>, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        self.read_units_x2.fetch_add(2, Relaxed);
        Ok(lock(&self.acks).get(log).copied())
    }

    async fn last(&self, log: &str) -> Result<Option<Slot>, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        let slot = lock(&self.slots)
            .range((log.to_owned(), 0)..=(log.to_owned(), u64::MAX))
            .next_back()
            .map(|(_, s)| s.clone());
        let bytes = slot.as_ref().map_or(0, |s| slot_item_size(log, s));
        self.requests.fetch_add(1, Relaxed);
        self.read_units_x2
            .fetch_add(bytes.div_ceil(4096).max(1) as u64 * 2, Relaxed);
        Ok(slot)
    }

    async fn put_blob(&self, blob: &Blob) -> Result<(), PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_add(1, Relaxed);
        let size = blob_item_size(blob);
        if size > DYNAMODB_ITEM_LIMIT {
            return Err(PortError::Rejected(format!(
                "ValidationException: Item size has exceeded the maximum allowed size ({size} bytes)"
            )));
        }
        let kind = if blob.pk.starts_with("cold#") {
            "page"
        } else {
            "ledger"
        };
        self.count_write(kind, size);
        lock(&self.blobs).insert((blob.pk.clone(), blob.sk), blob.clone());
        Ok(())
    }

    async fn blobs(&self, pk: &str, lo: u128, hi: u128) -> Result<Vec<Blob>, PortError> {
        use std::sync::atomic::Ordering::Relaxed;
        let found: Vec<Blob> = lock(&self.blobs)
            .range((pk.to_owned(), lo)..=(pk.to_owned(), hi))
            .map(|(_, b)| b.clone())
            .collect();
        let bytes: usize = found.iter().map(blob_item_size).sum();
        self.requests
            .fetch_add(1 + (bytes / (1024 * 1024)) as u64, Relaxed);
        self.read_units_x2
            .fetch_add(bytes.div_ceil(4096).max(1) as u64 * 2, Relaxed);
        Ok(found)
    }
}

/// A fixed shard-to-range map for tests.
#[derive(Debug, Clone, Default)]
pub struct FixedShardRanges(pub BTreeMap<String, BucketRange>);

impl ShardRanges for FixedShardRanges {
    async fn range(&self, _stream: &str, shard: &str) -> Result<BucketRange, PortError> {
        Ok(self.0.get(shard).copied().unwrap_or(BucketRange::ALL))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a half-applied update (each update is one
    // statement), so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
