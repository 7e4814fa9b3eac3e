//! In-memory implementations of the ports, with the same semantics as the AWS adapters: for
//! property tests with many cases, and for fault injection around the real adapters.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::join::{JoinItem, MAX_CLICKS_PER_IMPRESSION};
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

/// DynamoDB's item size limit (400 KB, attribute names and values together).
pub const DYNAMODB_ITEM_LIMIT: usize = 400 * 1024;

/// The size DynamoDB would count for this item in the AWS adapter's layout
/// (`adpipe_aws::dynamodb`): key, impression and click JSON, emitted marks, write order, TTL.
/// An estimate within a few bytes per attribute, so the in-memory state refuses what DynamoDB
/// would refuse.
pub fn dynamodb_item_size(impression_id: &str, item: &JoinItem) -> usize {
    let mut size = "pk".len() + impression_id.len() + "ttl".len() + 6;
    if let Some(imp) = &item.impression {
        size += "imp".len() + json_len(imp);
    }
    for (id, click) in &item.clicks {
        size += 2 + id.len() + json_len(click);
        if click.emitted {
            size += 2 + id.len() + 1;
        }
    }
    size += "o".len() + 3 + item.order.iter().map(|t| t.len() + 1).sum::<usize>();
    size
}

fn json_len<T: serde::Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(0, |v| v.len())
}

impl JoinState for InMemoryJoinState {
    async fn put_if_absent(
        &self,
        side: SideWrite<'_>,
        ttl_epoch_s: i64,
    ) -> Result<JoinItem, PortError> {
        let impression_id = side.impression_id().to_owned();
        let mut items = lock(&self.items);
        let before = items
            .get(&impression_id)
            .map(|(item, _)| item.clone())
            .unwrap_or_default();
        let mut after = before.clone();
        let stores = match side {
            SideWrite::Impression(i) => after.impression.is_none().then(|| {
                after.impression = Some(i.clone());
            }),
            SideWrite::Click(c) => (!after.clicks.contains_key(&c.click.click_id)
                && after.clicks.len() < MAX_CLICKS_PER_IMPRESSION)
                .then(|| {
                    after.clicks.insert(c.click.click_id.clone(), c.clone());
                }),
        };
        if stores.is_none() {
            // The side is already stored, or the item is full: nothing is written.
            return Ok(before);
        }
        after.order.push(side.order_token());
        let size = dynamodb_item_size(&impression_id, &after);
        if size > DYNAMODB_ITEM_LIMIT {
            return Err(PortError::Rejected(format!(
                "ValidationException: Item size has exceeded the maximum allowed size \
                 ({size} bytes for impression id {impression_id:?})"
            )));
        }
        items.insert(impression_id, (after, ttl_epoch_s));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::{StoredClick, StoredImpression};
    use crate::model::{Click, Impression};

    fn click(n: usize, text: &str) -> StoredClick {
        StoredClick {
            click: Click {
                ad_id: "ad".into(),
                impression_id: "imp".into(),
                campaign_id: "camp".into(),
                publisher_id: "pub".into(),
                event_time_ms: 0,
                device_type: text.into(),
                geo_location: "US".into(),
                platform: "ios".into(),
                click_price: 1.0,
                click_id: format!("c{n}"),
                click_id_derived: false,
            },
            arrived_at_ms: 0,
            source: "src".into(),
            emitted: false,
        }
    }

    #[tokio::test]
    async fn writes_nothing_for_a_stored_side_or_a_full_item_and_refuses_an_oversized_one() {
        let state = InMemoryJoinState::default();
        for n in 0..MAX_CLICKS_PER_IMPRESSION {
            state
                .put_if_absent(SideWrite::Click(&click(n, "mobile")), 1)
                .await
                .unwrap();
        }
        let (full, _) = state.item("imp").unwrap();
        // A redelivery and a click past the limit both leave the item as it was.
        let before = state
            .put_if_absent(SideWrite::Click(&click(0, "mobile")), 2)
            .await
            .unwrap();
        assert_eq!(before, full);
        state
            .put_if_absent(SideWrite::Click(&click(999, "mobile")), 2)
            .await
            .unwrap();
        assert_eq!(state.item("imp").unwrap(), (full, 1));

        // Past validation's limits (which this state does not apply), DynamoDB would refuse.
        let huge = "x".repeat(DYNAMODB_ITEM_LIMIT);
        let imp = StoredImpression {
            impression: Impression {
                ad_id: "ad".into(),
                impression_id: "other".into(),
                campaign_id: "camp".into(),
                publisher_id: "pub".into(),
                event_time_ms: 0,
                device_type: huge,
                geo_location: "US".into(),
                platform: "ios".into(),
                ad_type: "banner".into(),
                bid_price: 1.0,
            },
            arrived_at_ms: 0,
            source: "src".into(),
        };
        let err = state
            .put_if_absent(SideWrite::Impression(&imp), 1)
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::Rejected(_)), "{err:?}");
        assert!(state.item("other").is_none());
    }
}
