//! `DynamoDbJoinState`: the join state as one DynamoDB item per `impression_id`.
//!
//! Item layout (attribute names are constants below):
//! - `pk` (S): the impression id — the table's only key;
//! - `imp` (S): the impression with its arrival time, JSON;
//! - `c#<click_id>` (S): one attribute per click with its arrival time, JSON;
//! - `e#<click_id>` (BOOL): present once that pair's joined record was emitted;
//! - `o` (L of S): write-order tokens, one appended per stored side (who decided a pair);
//! - `nc` (N): the number of clicks stored;
//! - `ttl` (N): epoch seconds for DynamoDB's TTL (retention plus grace).
//!
//! Each arrival is one conditional `UpdateItem`: the side is stored only if it is absent (and,
//! for a click, only if the item holds fewer than [`MAX_CLICKS_PER_IMPRESSION`] clicks), with
//! `ReturnValues = ALL_OLD` and `ReturnValuesOnConditionCheckFailure = ALL_OLD`, so either way
//! the reply is the item as it was before: one write unit for a typical item, no read, and
//! DynamoDB's per-item serialisation makes that image the atomic basis of the join decision.
//! A redelivery writes nothing, so no item grows with redeliveries, and the field limits of
//! `adpipe_core::validate` with the click bound keep every item below the 400 KB limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use adpipe_core::join::{JoinItem, StoredClick, StoredImpression, MAX_CLICKS_PER_IMPRESSION};
use adpipe_core::ports::{JoinState, PortError, SideWrite};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue, ReturnConsumedCapacity, ReturnValue, ReturnValuesOnConditionCheckFailure,
};
use aws_sdk_dynamodb::Client;

use crate::error::port_error;

/// Partition key attribute.
pub const PK: &str = "pk";
/// Impression attribute.
pub const IMPRESSION: &str = "imp";
/// Prefix of click attributes.
pub const CLICK_PREFIX: &str = "c#";
/// Prefix of emitted-mark attributes.
pub const EMITTED_PREFIX: &str = "e#";
/// Write-order attribute.
pub const ORDER: &str = "o";
/// TTL attribute (enable TTL on it in the table).
pub const TTL: &str = "ttl";
/// Number of clicks stored (N), the bound of [`MAX_CLICKS_PER_IMPRESSION`].
pub const CLICK_COUNT: &str = "nc";

/// Requests and write units this adapter spent, for the cost benchmarks. Write units follow
/// DynamoDB's rule for `UpdateItem`: the larger of the item's size before and after, in 1 KB
/// units, rounded up (computed from the real items, since local endpoints do not report them).
#[derive(Debug, Default)]
pub struct Usage {
    pub update_requests: AtomicU64,
    pub write_units: AtomicU64,
    pub read_units: AtomicU64,
}

impl Usage {
    fn record_write(&self, before: usize, after: usize) {
        self.update_requests.fetch_add(1, Ordering::Relaxed);
        let units = before.max(after).div_ceil(1024).max(1) as u64;
        self.write_units.fetch_add(units, Ordering::Relaxed);
    }
}

/// Join state in a DynamoDB table.
#[derive(Debug)]
pub struct DynamoDbJoinState {
    client: Client,
    table: String,
    pub usage: Usage,
}

impl DynamoDbJoinState {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoDbJoinState {
            client,
            table: table.into(),
            usage: Usage::default(),
        }
    }
}

fn encode<T: serde::Serialize>(v: &T) -> Result<String, PortError> {
    serde_json::to_string(v).map_err(|e| PortError::Corrupt(format!("cannot encode state: {e}")))
}

/// The attribute name of a click.
pub fn click_attribute(click_id: &str) -> String {
    format!("{CLICK_PREFIX}{click_id}")
}

/// The attribute name of a pair's emitted mark.
pub fn emitted_attribute(click_id: &str) -> String {
    format!("{EMITTED_PREFIX}{click_id}")
}

/// Reads a stored item back into the domain model.
pub fn decode_item(item: &HashMap<String, AttributeValue>) -> Result<JoinItem, PortError> {
    let mut out = JoinItem::default();
    let text = |name: &str, v: &AttributeValue| -> Result<String, PortError> {
        v.as_s()
            .cloned()
            .map_err(|_| PortError::Corrupt(format!("attribute {name} is not a string")))
    };
    for (name, value) in item {
        if name == IMPRESSION {
            let s = text(name, value)?;
            let imp: StoredImpression = serde_json::from_str(&s)
                .map_err(|e| PortError::Corrupt(format!("attribute {name}: {e}")))?;
            out.impression = Some(imp);
        } else if name == ORDER {
            let list = value
                .as_l()
                .map_err(|_| PortError::Corrupt(format!("attribute {name} is not a list")))?;
            out.order = list
                .iter()
                .map(|t| text(name, t))
                .collect::<Result<_, _>>()?;
        } else if let Some(id) = name.strip_prefix(CLICK_PREFIX) {
            let s = text(name, value)?;
            let mut click: StoredClick = serde_json::from_str(&s)
                .map_err(|e| PortError::Corrupt(format!("attribute {name}: {e}")))?;
            click.emitted = item.contains_key(&emitted_attribute(id));
            out.clicks.insert(id.to_owned(), click);
        }
    }
    Ok(out)
}

/// DynamoDB's size of an attribute value, in bytes.
fn value_size(v: &AttributeValue) -> usize {
    match v {
        AttributeValue::S(s) => s.len(),
        // Numbers: about one byte per two significant digits, plus one.
        AttributeValue::N(n) => n.trim_start_matches('-').len().div_ceil(2) + 1,
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::M(m) => {
            3 + m
                .iter()
                .map(|(k, v)| k.len() + value_size(v) + 1)
                .sum::<usize>()
        }
        AttributeValue::L(l) => 3 + l.iter().map(|v| value_size(v) + 1).sum::<usize>(),
        AttributeValue::Ss(s) => s.iter().map(String::len).sum(),
        AttributeValue::Ns(n) => n.iter().map(|x| x.len().div_ceil(2) + 1).sum(),
        AttributeValue::Bs(b) => b.iter().map(|x| x.as_ref().len()).sum(),
        _ => 0,
    }
}

/// DynamoDB's size of an item: attribute names plus values.
pub fn item_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter().map(|(k, v)| k.len() + value_size(v)).sum()
}

impl JoinState for DynamoDbJoinState {
    async fn put_if_absent(
        &self,
        side: SideWrite<'_>,
        ttl_epoch_s: i64,
    ) -> Result<JoinItem, PortError> {
        let impression_id = side.impression_id().to_owned();
        let (attribute, value) = match side {
            SideWrite::Impression(i) => (IMPRESSION.to_owned(), encode(i)?),
            SideWrite::Click(c) => (click_attribute(&c.click.click_id), encode(c)?),
        };
        let is_click = matches!(side, SideWrite::Click(_));
        let ttl = AttributeValue::N(ttl_epoch_s.to_string());
        let side_value = AttributeValue::S(value);
        let token = AttributeValue::S(side.order_token());
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(PK, AttributeValue::S(impression_id.clone()))
            .expression_attribute_names("#side", &attribute)
            .expression_attribute_names("#ttl", TTL)
            .expression_attribute_names("#order", ORDER)
            .expression_attribute_values(":side", side_value.clone())
            .expression_attribute_values(":ttl", ttl.clone())
            .expression_attribute_values(":empty", AttributeValue::L(Vec::new()))
            .expression_attribute_values(":token", AttributeValue::L(vec![token.clone()]))
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .return_consumed_capacity(ReturnConsumedCapacity::Total);
        let set = "SET #side = :side, #ttl = :ttl, \
                   #order = list_append(if_not_exists(#order, :empty), :token)";
        request = if is_click {
            request
                .condition_expression(
                    "attribute_not_exists(#side) AND (attribute_not_exists(#n) OR #n < :max)",
                )
                .update_expression(format!("{set}, #n = if_not_exists(#n, :zero) + :one"))
                .expression_attribute_names("#n", CLICK_COUNT)
                .expression_attribute_values(
                    ":max",
                    AttributeValue::N(MAX_CLICKS_PER_IMPRESSION.to_string()),
                )
                .expression_attribute_values(":zero", AttributeValue::N("0".into()))
                .expression_attribute_values(":one", AttributeValue::N("1".into()))
        } else {
            request
                .condition_expression("attribute_not_exists(#side)")
                .update_expression(set)
        };
        let before = match request.send().await {
            Ok(out) => out.attributes.unwrap_or_default(),
            Err(e) => match e.as_service_error() {
                // The side is stored already, or the item is full: nothing was written, and
                // DynamoDB returned the item as it is (a failed condition still costs units).
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    let item = failed.item.clone().unwrap_or_default();
                    let size = item_size(&item);
                    self.usage.record_write(size, size);
                    return decode_item(&item);
                }
                _ => return Err(port_error("DynamoDB UpdateItem", e)),
            },
        };
        let mut after = before.clone();
        after.insert(PK.to_owned(), AttributeValue::S(impression_id));
        after.insert(attribute, side_value);
        after.insert(TTL.to_owned(), ttl);
        let mut order = before
            .get(ORDER)
            .and_then(|o| o.as_l().ok())
            .cloned()
            .unwrap_or_default();
        order.push(token);
        after.insert(ORDER.to_owned(), AttributeValue::L(order));
        if is_click {
            let n = decode_item(&before)?.clicks.len() + 1;
            after.insert(CLICK_COUNT.to_owned(), AttributeValue::N(n.to_string()));
        }
        self.usage
            .record_write(item_size(&before), item_size(&after));
        decode_item(&before)
    }

    async fn mark_emitted(
        &self,
        impression_id: &str,
        click_id: &str,
        ttl_epoch_s: i64,
    ) -> Result<(), PortError> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(PK, AttributeValue::S(impression_id.to_owned()))
            // The item exists (the pair was decided from it); never recreate a deleted one.
            .condition_expression("attribute_exists(#pk)")
            .update_expression("SET #e = :t, #ttl = if_not_exists(#ttl, :ttl)")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#e", emitted_attribute(click_id))
            .expression_attribute_names("#ttl", TTL)
            .expression_attribute_values(":t", AttributeValue::Bool(true))
            .expression_attribute_values(":ttl", AttributeValue::N(ttl_epoch_s.to_string()))
            .return_values(ReturnValue::AllNew)
            .send()
            .await
            .map_err(|e| port_error("DynamoDB UpdateItem (emitted mark)", e))?;
        let after = out.attributes.unwrap_or_default();
        let size = item_size(&after);
        self.usage.record_write(size, size);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_size_counts_names_and_values() {
        let item: HashMap<String, AttributeValue> = [
            ("pk".to_owned(), AttributeValue::S("imp-1".into())),
            ("ttl".to_owned(), AttributeValue::N("1795169730".into())),
            ("e#c".to_owned(), AttributeValue::Bool(true)),
        ]
        .into();
        assert_eq!(item_size(&item), (2 + 5) + (3 + 6) + (3 + 1));
    }

    #[test]
    fn corrupt_attributes_are_reported_not_ignored() {
        let item: HashMap<String, AttributeValue> =
            [("imp".to_owned(), AttributeValue::S("{".into()))].into();
        assert!(matches!(decode_item(&item), Err(PortError::Corrupt(_))));
        let item: HashMap<String, AttributeValue> =
            [("c#x".to_owned(), AttributeValue::N("1".into()))].into();
        assert!(matches!(decode_item(&item), Err(PortError::Corrupt(_))));
    }
}
