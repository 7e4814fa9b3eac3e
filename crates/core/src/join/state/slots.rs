//! Log slots: what a batch writes, split into slots of at most [`MAX_SLOT_BODY_BYTES`], and
//! their bodies' encoding (a JSON header, column-wise events and pending outputs, zstd).

use crate::ports::PortError;

use super::model::{Blob, Pending, Slot, SlotBody, Stored, MAX_SLOT_BODY_BYTES, SLOT_FORMAT};

/// Compresses a slot body: its header as JSON, its events and pending outputs column-wise
/// ([`crate::codec`]), then zstd.
pub fn encode_body(body: &SlotBody) -> Vec<u8> {
    let header = SlotBody {
        events: Vec::new(),
        pending: Vec::new(),
        ..body.clone()
    };
    let json = serde_json::to_vec(&header).expect("a slot header always encodes");
    super::codec::encode_slot(&json, &body.events, &body.pending)
}

/// Reads a slot body back (either format).
pub fn decode_body(bytes: &[u8]) -> Result<SlotBody, PortError> {
    let raw = zstd::stream::decode_all(bytes)
        .map_err(|e| PortError::Corrupt(format!("slot body is not zstd: {e}")))?;
    let (json, events, pending, format) = if raw.starts_with(super::codec::SLOT_MAGIC) {
        let (header, events, pending) = super::codec::decode_slot(&raw)?;
        (header, Some(events), pending, SLOT_FORMAT)
    } else {
        (&raw[..], None, Vec::new(), 1)
    };
    let mut body: SlotBody = serde_json::from_slice(json)
        .map_err(|e| PortError::Corrupt(format!("slot body is not a slot: {e}")))?;
    if body.v != format {
        return Err(PortError::Corrupt(format!(
            "slot format {} is not {format}",
            body.v
        )));
    }
    if let Some(events) = events {
        body.events = events;
        body.pending = pending;
    }
    Ok(body)
}

/// Splits what a batch writes into slot bodies of at most [`MAX_SLOT_BODY_BYTES`] compressed,
/// numbered from `first`. Only the last slot carries the batch's final progress; every slot
/// carries `batch_first`, so a reader takes the pending outputs of all of them, and, when there
/// are several, `batch_last`, so a reader knows whether all of them were written.
#[allow(clippy::too_many_arguments)]
pub fn slots_for_batch(
    first: u64,
    shard: &str,
    progress_before: Option<&str>,
    progress_after: Option<&str>,
    now_ms: i64,
    swept_ms: i64,
    events: Vec<Stored>,
    pending: Vec<Pending>,
    cold_marks: (Option<i64>, Option<u64>),
    ttl_epoch_s: i64,
) -> Vec<Slot> {
    enum Item {
        E(Stored),
        P(Pending),
    }
    let items: Vec<Item> = events
        .into_iter()
        .map(Item::E)
        .chain(pending.into_iter().map(Item::P))
        .collect();
    fn body_of(items: &[Item], base: &SlotBody) -> SlotBody {
        let mut body = base.clone();
        for item in items {
            match item {
                Item::E(e) => body.events.push(e.clone()),
                Item::P(p) => body.pending.push(p.clone()),
            }
        }
        body
    }
    fn split<'a>(items: &'a [Item], base: &SlotBody, out: &mut Vec<&'a [Item]>) {
        if items.len() <= 1 || encode_body(&body_of(items, base)).len() <= MAX_SLOT_BODY_BYTES {
            out.push(items);
            return;
        }
        let (a, b) = items.split_at(items.len() / 2);
        split(a, base, out);
        split(b, base, out);
    }
    let base = SlotBody {
        v: SLOT_FORMAT,
        shard: shard.to_owned(),
        progress: progress_before.map(str::to_owned),
        batch_first: first,
        batch_last: None,
        now_ms,
        swept_ms,
        events: Vec::new(),
        pending: Vec::new(),
        cold_from_ms: cold_marks.0,
        warm_from: cold_marks.1,
    };
    let mut chunks = Vec::new();
    split(&items, &base, &mut chunks);
    let last = chunks.len() - 1;
    let batch_last = (last > 0).then_some(first + last as u64);
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut body = body_of(chunk, &base);
            body.batch_last = batch_last;
            if i == last {
                body.progress = progress_after.map(str::to_owned);
            }
            Slot {
                n: first + i as u64,
                body: encode_body(&body),
                ttl_epoch_s,
            }
        })
        .collect()
}

/// The size DynamoDB counts for a slot item (attribute names and values).
pub fn slot_item_size(log: &str, slot: &Slot) -> usize {
    let pk = "pk".len() + "log#".len() + log.len();
    let sk = "sk".len() + 21;
    let ttl = "ttl".len() + 21;
    pk + sk + ttl + "d".len() + slot.body.len()
}

/// The size DynamoDB counts for a blob item.
pub fn blob_item_size(blob: &Blob) -> usize {
    "pk".len() + blob.pk.len() + "sk".len() + 21 + "ttl".len() + 21 + "d".len() + blob.body.len()
}
