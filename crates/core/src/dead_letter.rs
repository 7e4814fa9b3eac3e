//! Dead-letter and late-pair entries: their JSON body and their deterministic object keys.
//!
//! A key names the record's identity (its Kinesis position, or the pair key for late pairs), so
//! a retried batch rewrites the same object: every bad record is dead-lettered exactly once.

use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::json;

use crate::join::rule::LatePair;
use crate::model::{JoinedRecord, SourcePosition};
use crate::ports::DeadLetter;
use crate::time::format_millis;
use crate::validate::Rejection;

/// Everything but `A-Z a-z 0-9 - _ .` is escaped, so a key segment can never contain `/` or
/// form `..`-style traversal, whatever the input.
const KEY_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// The longest key segment [`key_segment`] makes, in bytes. S3 keys are limited to 1,024 bytes
/// and a percent-encoded id can take 12 bytes per character (a 4-byte character, each byte
/// `%XX`): 256 such characters would make 3,072. Every key we build has at most four segments
/// from input plus fixed text, so bounding each segment bounds every key by construction.
pub const MAX_KEY_SEGMENT_BYTES: usize = 128;

/// One safe S3 key segment from untrusted text, at most [`MAX_KEY_SEGMENT_BYTES`] long. `.` and
/// `..` are escaped too. A value whose encoding is longer keeps a readable head of it followed
/// by `~` and a SHA-256 digest of the whole value: still one distinct segment per distinct value
/// (`~` is always escaped in an encoded value, so the two forms cannot meet).
pub fn key_segment(raw: &str) -> String {
    use sha2::{Digest, Sha256};
    let enc = utf8_percent_encode(raw, KEY_SEGMENT).to_string();
    if enc.is_empty() {
        return "%00".to_owned();
    }
    if enc.len() <= MAX_KEY_SEGMENT_BYTES {
        return enc;
    }
    let digest: String = Sha256::digest(raw.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // The head is whole characters, so it still decodes to a prefix of the value.
    let budget = MAX_KEY_SEGMENT_BYTES - 1 - digest.len();
    let mut head = String::with_capacity(budget);
    let mut buf = [0u8; 4];
    for c in raw.chars() {
        let piece = utf8_percent_encode(c.encode_utf8(&mut buf), KEY_SEGMENT).to_string();
        if head.len() + piece.len() > budget {
            break;
        }
        head.push_str(&piece);
    }
    format!("{head}~{digest}")
}

/// The entry for a refused record.
pub fn rejected(
    prefix: &str,
    function: &str,
    position: &SourcePosition,
    data: &[u8],
    rejection: &Rejection,
    now_ms: i64,
) -> DeadLetter {
    // A user record of a KPL aggregate adds `.<sub-sequence number>`: `.` is always escaped
    // inside a segment, so the two forms cannot meet.
    let sub = position
        .sub_sequence_number
        .map(|n| format!(".{n}"))
        .unwrap_or_default();
    let key = format!(
        "{prefix}{}/{}/{}/{}{sub}.json",
        key_segment(function),
        key_segment(&position.stream),
        key_segment(&position.shard),
        key_segment(&position.sequence_number)
    );
    let mut body = json!({
        "kind": "rejected",
        "function": function,
        "reason": rejection.reason.as_str(),
        "detail": rejection.detail,
        "stream": position.stream,
        "shard": position.shard,
        "sequence_number": position.sequence_number,
        "recorded_at": format_millis(now_ms),
        "data_base64": base64::engine::general_purpose::STANDARD.encode(data),
    });
    if let Some(sub) = position.sub_sequence_number {
        body["sub_sequence_number"] = json!(sub);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        body["data"] = json!(text);
    }
    DeadLetter {
        key,
        body: body.to_string().into_bytes(),
    }
}

/// The entry for one record of a pack (a joined-stream record carrying several): keyed by the
/// pack's position and the record's place in it, so each is its own entry and a redelivery
/// rewrites the same ones. `data` is the record alone.
pub fn rejected_part(
    prefix: &str,
    function: &str,
    position: &SourcePosition,
    part: usize,
    data: &[u8],
    rejection: &Rejection,
    now_ms: i64,
) -> DeadLetter {
    let mut letter = rejected(prefix, function, position, data, rejection, now_ms);
    let stem = letter
        .key
        .strip_suffix(".json")
        .expect("a rejected entry's key ends in .json");
    letter.key = format!("{stem}-{part}.json");
    let mut body: serde_json::Value =
        serde_json::from_slice(&letter.body).expect("the entry is JSON");
    body["part"] = json!(part);
    letter.body = body.to_string().into_bytes();
    letter
}

/// The entry for a pair whose partners met only after the retention.
pub fn late(
    prefix: &str,
    function: &str,
    pair: &LatePair,
    retention_ms: i64,
    now_ms: i64,
) -> DeadLetter {
    let key = format!(
        "{prefix}{}/{}/{}.json",
        key_segment(function),
        key_segment(&pair.impression.impression_id),
        key_segment(&pair.click.click_id)
    );
    let body = json!({
        "kind": "late",
        "function": function,
        "reason": "partner arrived after the state retention",
        "arrival_gap_ms": pair.arrival_gap_ms,
        "retention_ms": retention_ms,
        "recorded_at": format_millis(now_ms),
        "pair": JoinedRecord::new(&pair.impression, &pair.click),
    });
    DeadLetter {
        key,
        body: body.to_string().into_bytes(),
    }
}

/// The entry for a click whose retention ended without an impression it joins (an orphan).
pub fn orphan(
    prefix: &str,
    function: &str,
    click: &crate::model::Click,
    arrival_ms: i64,
    retention_ms: i64,
    now_ms: i64,
) -> DeadLetter {
    let key = format!(
        "{prefix}orphan/{}/{}/{}.json",
        key_segment(function),
        key_segment(&click.impression_id),
        key_segment(&click.click_id)
    );
    let body = json!({
        "kind": "orphan",
        "function": function,
        "reason": "no impression joined this click within the state retention",
        "arrived_at": format_millis(arrival_ms),
        "retention_ms": retention_ms,
        "recorded_at": format_millis(now_ms),
        "click": click,
    });
    DeadLetter {
        key,
        body: body.to_string().into_bytes(),
    }
}

/// One entry for every event of one keyed-stream record refused for the same reason, keyed by
/// that record's position (so a redo rewrites the same object) and the reason. Each element of
/// `entries` is the [`rejected`] entry the event would have had alone. Used for refusals that
/// come in bulk: an operator's replay of traffic older than the deduplication horizon is
/// refused event by event, and one object per event would be hundreds of millions of PUTs. A
/// keyed record holds one input batch's events of one state bucket (at most 64 KiB, about 200
/// events), so this is one object per (input batch size ÷ 64) events at most: 8 at the
/// template's 500-record batches, up to 156 at 10,000. The keyed record's position is the
/// only key a redo is sure to rebuild with the same events: a key per batch would change with
/// Lambda's batching and lose or repeat entries.
pub fn rejected_group(
    prefix: &str,
    function: &str,
    keyed: &SourcePosition,
    reason: &str,
    entries: &[DeadLetter],
    now_ms: i64,
) -> DeadLetter {
    let key = format!(
        "{prefix}{}/{}/{}/{}.{}.json",
        key_segment(function),
        key_segment(&keyed.stream),
        key_segment(&keyed.shard),
        key_segment(&keyed.sequence_number),
        key_segment(reason)
    );
    let entries: Vec<serde_json::Value> = entries
        .iter()
        .map(|l| serde_json::from_slice(&l.body).expect("a dead-letter entry is JSON"))
        .collect();
    let body = json!({
        "kind": "rejected_group",
        "function": function,
        "reason": reason,
        "keyed_stream": keyed.stream,
        "keyed_shard": keyed.shard,
        "keyed_sequence_number": keyed.sequence_number,
        "count": entries.len(),
        "recorded_at": format_millis(now_ms),
        "entries": entries,
    });
    DeadLetter {
        key,
        body: body.to_string().into_bytes(),
    }
}

/// The entry for an output the joined stream never took before its events left the join state
/// (past the deduplication horizon): it cannot be rebuilt, so it is recorded here instead of
/// vanishing. `click_id` is `None` for a forwarded impression.
pub fn lost_output(
    prefix: &str,
    function: &str,
    impression_id: &str,
    click_id: Option<&str>,
    now_ms: i64,
) -> DeadLetter {
    let key = format!(
        "{prefix}lost-output/{}/{}/{}.json",
        key_segment(function),
        key_segment(impression_id),
        key_segment(click_id.unwrap_or("impression"))
    );
    let body = json!({
        "kind": "lost_output",
        "function": function,
        "reason": "the joined stream did not take this output before its events left the join state (past the deduplication horizon)",
        "impression_id": impression_id,
        "click_id": click_id,
        "recorded_at": format_millis(now_ms),
    });
    DeadLetter {
        key,
        body: body.to_string().into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::RejectReason;

    #[test]
    fn key_segments_cannot_traverse_or_nest() {
        for raw in ["../x", "a/b", "%2F", "..", ".", "", "ü/é", "a b"] {
            let seg = key_segment(raw);
            assert!(!seg.contains('/'), "{raw} -> {seg}");
            assert!(seg != "." && seg != "..", "{raw} -> {seg}");
            assert!(seg.is_ascii());
        }
        assert_eq!(key_segment("shardId-000000000000"), "shardId-000000000000");
        assert_ne!(key_segment("%2F"), key_segment("/"));
    }

    #[test]
    fn long_segments_are_bounded_and_stay_distinct() {
        let worst = "\u{1D11E}".repeat(256); // 4 bytes each in UTF-8, 12 encoded
        for raw in [
            "é".repeat(256),
            worst.clone(),
            "/".repeat(256),
            "a".repeat(1000),
            format!("{worst}x"),
        ] {
            let seg = key_segment(&raw);
            assert!(seg.len() <= MAX_KEY_SEGMENT_BYTES, "{} bytes", seg.len());
            assert!(!seg.contains('/') && seg.is_ascii());
            // The head is whole `%XX` triples: it decodes.
            let head = seg.split('~').next().unwrap();
            assert!(percent_encoding::percent_decode_str(head)
                .decode_utf8()
                .is_ok());
        }
        assert_ne!(key_segment(&worst), key_segment(&format!("{worst}x")));
        assert_ne!(key_segment(&"a".repeat(200)), key_segment(&"a".repeat(201)));
        // Short values keep their plain encoding, and none contains the digest marker.
        assert_eq!(key_segment("camp-1"), "camp-1");
        assert!(!key_segment("~").contains('~'));
        let exactly = "b".repeat(MAX_KEY_SEGMENT_BYTES);
        assert_eq!(key_segment(&exactly), exactly);
    }

    #[test]
    fn the_longest_dead_letter_and_late_keys_fit_s3() {
        let long = "\u{1D11E}".repeat(256);
        let pos = SourcePosition {
            stream: long.clone(),
            shard: long.clone(),
            sequence_number: long.clone(),
            sub_sequence_number: None,
        };
        let rej = Rejection::new(RejectReason::InvalidJson, "bad");
        let letter = rejected("dead-letter/", &long, &pos, b"x", &rej, 0);
        assert!(letter.key.len() <= 1024, "{}", letter.key.len());
    }

    #[test]
    fn rejected_entry_keeps_reason_position_and_raw_bytes() {
        let pos = SourcePosition {
            stream: "adpipe-local-impressions".into(),
            shard: "shardId-000000000001".into(),
            sequence_number: "4959".into(),
            sub_sequence_number: None,
        };
        let rej = Rejection::new(RejectReason::InvalidJson, "bad");
        let letter = rejected("dead-letter/", "joiner", &pos, b"\xffoops", &rej, 0);
        assert_eq!(
            letter.key,
            "dead-letter/joiner/adpipe-local-impressions/shardId-000000000001/4959.json"
        );
        let body: serde_json::Value = serde_json::from_slice(&letter.body).unwrap();
        assert_eq!(body["reason"], "invalid_json");
        assert_eq!(body["sequence_number"], "4959");
        assert_eq!(body["data_base64"], "/29vcHM=");
        assert!(body.get("data").is_none(), "not UTF-8, so only base64");
        assert!(body.get("sub_sequence_number").is_none());

        // The user records of one KPL aggregate share its sequence number: each has its own
        // entry, none meets the aggregate's own.
        let mut user = pos.clone();
        user.sub_sequence_number = Some(12);
        let letter = rejected("dead-letter/", "joiner", &user, b"{}", &rej, 0);
        assert_eq!(
            letter.key,
            "dead-letter/joiner/adpipe-local-impressions/shardId-000000000001/4959.12.json"
        );
        let body: serde_json::Value = serde_json::from_slice(&letter.body).unwrap();
        assert_eq!(body["sub_sequence_number"], 12);
        user.sequence_number = "4959.12".into();
        user.sub_sequence_number = None;
        assert_ne!(
            rejected("dead-letter/", "joiner", &user, b"{}", &rej, 0).key,
            letter.key
        );
    }
}
