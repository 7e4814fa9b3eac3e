//! In-memory implementations of the ports, with the same semantics as the AWS adapters: for
//! property tests with many cases, and for fault injection around the real adapters.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::join::JoinItem;
use crate::ports::{
    DeadLetter, DeadLetterSink, EntryResult, JoinState, OutRecord, PortError, RecordSink, SideWrite,
};

/// Join state in a mutex-guarded map: linearisable, like DynamoDB's single-item updates.
#[derive(Debug, Default)]
pub struct InMemoryJoinState {
    items: Mutex<HashMap<String, (JoinItem, i64)>>,
}

impl InMemoryJoinState {
    /// The item and its TTL (epoch seconds), if any.
    pub fn item(&self, impression_id: &str) -> Option<(JoinItem, i64)> {
        lock(&self.items).get(impression_id).cloned()
    }

    pub fn len(&self) -> usize {
        lock(&self.items).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a half-applied update (each update is one
    // statement), so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl JoinState for InMemoryJoinState {
    async fn put_if_absent(
        &self,
        side: SideWrite<'_>,
        ttl_epoch_s: i64,
    ) -> Result<JoinItem, PortError> {
        let mut items = lock(&self.items);
        let entry = items
            .entry(side.impression_id().to_owned())
            .or_insert_with(|| (JoinItem::default(), ttl_epoch_s));
        let before = entry.0.clone();
        match side {
            SideWrite::Impression(i) => {
                entry.0.impression.get_or_insert_with(|| i.clone());
            }
            SideWrite::Click(c) => {
                entry
                    .0
                    .clicks
                    .entry(c.click.click_id.clone())
                    .or_insert_with(|| c.clone());
            }
        }
        entry.0.order.push(side.order_token());
        entry.1 = ttl_epoch_s;
        Ok(before)
    }

    async fn mark_emitted(
        &self,
        impression_id: &str,
        click_id: &str,
        ttl_epoch_s: i64,
    ) -> Result<(), PortError> {
        let mut items = lock(&self.items);
        if let Some((item, ttl)) = items.get_mut(impression_id) {
            if let Some(c) = item.clicks.get_mut(click_id) {
                c.emitted = true;
            }
            *ttl = (*ttl).max(ttl_epoch_s);
        }
        Ok(())
    }
}

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
