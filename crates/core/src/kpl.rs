//! KPL-aggregated Kinesis records: many user records packed into one Kinesis record by the
//! Kinesis Producer Library, the Kinesis Agent, Fluent Bit and other producers that use its
//! format. Lambda delivers an aggregate as one record; the consumer unpacks it.
//!
//! The format: the magic bytes `F3 89 9A C2`, a protobuf `AggregatedRecord`, and the MD5 digest
//! of the protobuf bytes (16 bytes):
//!
//! ```text
//! message AggregatedRecord {
//!   repeated string partition_key_table     = 1;
//!   repeated string explicit_hash_key_table = 2;
//!   repeated Record records                 = 3;
//! }
//! message Record {
//!   required uint64 partition_key_index     = 1;
//!   optional uint64 explicit_hash_key_index = 2;
//!   required bytes  data                    = 3;
//!   repeated Tag    tags                    = 4;
//! }
//! message Tag { required string key = 1; optional string value = 2; }
//! ```
//!
//! A record that begins with the magic bytes is an aggregate (no JSON document can begin with
//! `0xF3`). Each of its user records is validated, joined and dead-lettered on its own, at the
//! position *sequence number + sub-sequence number* (its index in the aggregate). An aggregate
//! that cannot be read (a wrong digest, a truncated or invalid protobuf, a key index out of its
//! table, no user record, more than [`MAX_USER_RECORDS_PER_AGGREGATE`]) is refused whole as
//! `invalid_aggregate`, once, with the reason.

use std::borrow::Cow;

use md5::{Digest, Md5};
use prost::Message;

use crate::model::InputRecord;
use crate::validate::{RejectReason, Rejection};

/// The first four bytes of every aggregate.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Length of the MD5 trailer.
const DIGEST_BYTES: usize = 16;

/// The most user records one aggregate may carry. A real producer's aggregate is at most 1 MiB
/// (the KPL's `AggregationMaxSize` default is 51,200 bytes), and every valid event is well over
/// 100 bytes, so a producer of real events stays far below it. The bound keeps what one
/// aggregate expands to (a position and a copy of the data per user record) in proportion.
pub const MAX_USER_RECORDS_PER_AGGREGATE: usize = 10_000;

/// The most user records the router unpacks at once. A batch whose aggregates hold more is
/// routed in parts of at most this many (an aggregate is never split), so the memory a batch
/// takes is bounded whatever its records hold: Lambda's 6 MB payload could otherwise carry
/// about a million empty user records.
pub const MAX_USER_RECORDS_IN_MEMORY: usize = 20_000;

#[derive(Clone, PartialEq, Message)]
struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    records: Vec<Record>,
}

#[derive(Clone, PartialEq, Message)]
struct Record {
    #[prost(uint64, required, tag = "1")]
    partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "vec", required, tag = "3")]
    data: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    tags: Vec<Tag>,
}

#[derive(Clone, PartialEq, Message)]
struct Tag {
    #[prost(string, required, tag = "1")]
    key: String,
    #[prost(string, optional, tag = "2")]
    value: Option<String>,
}

/// Whether `data` is an aggregate (begins with the magic bytes).
pub fn is_aggregate(data: &[u8]) -> bool {
    data.starts_with(&MAGIC)
}

fn invalid(detail: String) -> Rejection {
    Rejection::new(RejectReason::InvalidAggregate, detail)
}

/// The user records' data of an aggregate, in order, or why it cannot be read.
pub fn deaggregate(data: &[u8]) -> Result<Vec<Vec<u8>>, Rejection> {
    let Some(rest) = data.strip_prefix(&MAGIC) else {
        return Err(invalid("no KPL magic bytes".into()));
    };
    if rest.len() < DIGEST_BYTES {
        return Err(invalid(format!(
            "{} bytes after the magic bytes: shorter than the {DIGEST_BYTES}-byte MD5 trailer",
            rest.len()
        )));
    }
    let (body, digest) = rest.split_at(rest.len() - DIGEST_BYTES);
    if Md5::digest(body).as_slice() != digest {
        return Err(invalid(
            "the MD5 trailer does not match the protobuf body (corrupt or truncated)".into(),
        ));
    }
    let aggregate = AggregatedRecord::decode(body)
        .map_err(|e| invalid(format!("the protobuf body does not decode: {e}")))?;
    if aggregate.records.is_empty() {
        return Err(invalid("the aggregate holds no user record".into()));
    }
    if aggregate.records.len() > MAX_USER_RECORDS_PER_AGGREGATE {
        return Err(invalid(format!(
            "{} user records: more than the {MAX_USER_RECORDS_PER_AGGREGATE} one aggregate may hold",
            aggregate.records.len()
        )));
    }
    let (keys, hash_keys) = (
        aggregate.partition_key_table.len() as u64,
        aggregate.explicit_hash_key_table.len() as u64,
    );
    for (i, r) in aggregate.records.iter().enumerate() {
        if r.partition_key_index >= keys {
            return Err(invalid(format!(
                "user record {i}: partition key index {} is outside the table of {keys}",
                r.partition_key_index
            )));
        }
        if let Some(h) = r.explicit_hash_key_index.filter(|&h| h >= hash_keys) {
            return Err(invalid(format!(
                "user record {i}: explicit hash key index {h} is outside the table of {hash_keys}"
            )));
        }
    }
    Ok(aggregate.records.into_iter().map(|r| r.data).collect())
}

/// One user record of a batch: a plain record as it came, a user record of an aggregate at its
/// sub-sequence number, or an aggregate refused whole.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord<'a> {
    /// The index of the Kinesis record it came from, in the batch.
    pub index: usize,
    pub record: Cow<'a, InputRecord>,
    /// Why the whole record is refused (an aggregate that cannot be read).
    pub refused: Option<Rejection>,
}

/// The user records of one Kinesis record.
pub fn user_records(index: usize, record: &InputRecord) -> Vec<UserRecord<'_>> {
    let whole = |refused| {
        vec![UserRecord {
            index,
            record: Cow::Borrowed(record),
            refused,
        }]
    };
    if record.invalid_base64.is_some() || !is_aggregate(&record.data) {
        return whole(None);
    }
    match deaggregate(&record.data) {
        Err(rejection) => whole(Some(rejection)),
        Ok(parts) => parts
            .into_iter()
            .enumerate()
            .map(|(sub, data)| {
                let mut position = record.position.clone();
                position.sub_sequence_number = Some(sub as u64);
                UserRecord {
                    index,
                    record: Cow::Owned(InputRecord {
                        position,
                        data,
                        invalid_base64: None,
                        arrival_ms: record.arrival_ms,
                    }),
                    refused: None,
                }
            })
            .collect(),
    }
}

/// Splits a batch into runs of whole Kinesis records whose user records number at most
/// [`MAX_USER_RECORDS_IN_MEMORY`] (a run always holds at least one record). Counting reads only
/// the protobuf's record tags, so nothing is copied.
pub fn runs(records: &[InputRecord]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut held) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        let n = user_record_count(r);
        if i > start && held + n > MAX_USER_RECORDS_IN_MEMORY {
            out.push(start..i);
            (start, held) = (i, 0);
        }
        held += n;
    }
    if start < records.len() {
        out.push(start..records.len());
    }
    out
}

/// How many user records a Kinesis record unpacks to, at most (1 for a plain or unreadable
/// record), without decoding the data.
fn user_record_count(record: &InputRecord) -> usize {
    if record.invalid_base64.is_some() || !is_aggregate(&record.data) {
        return 1;
    }
    let body = &record.data[MAGIC.len()..];
    let body = &body[..body.len().saturating_sub(DIGEST_BYTES)];
    count_field(body, 3).clamp(1, MAX_USER_RECORDS_PER_AGGREGATE)
}

/// The number of top-level length-delimited fields `tag` in a protobuf message (stops at the
/// first malformed field: what follows it is refused anyway).
fn count_field(mut body: &[u8], tag: u64) -> usize {
    use prost::encoding::{decode_key, decode_varint, WireType};
    let mut n = 0;
    while !body.is_empty() {
        let Ok((field, wire)) = decode_key(&mut body) else {
            break;
        };
        let skip = match wire {
            WireType::Varint => decode_varint(&mut body).map(|_| 0),
            WireType::LengthDelimited => decode_varint(&mut body),
            WireType::SixtyFourBit => Ok(8),
            WireType::ThirtyTwoBit => Ok(4),
            _ => break,
        };
        let Ok(skip) = usize::try_from(skip.unwrap_or(u64::MAX)) else {
            break;
        };
        if skip > body.len() {
            break;
        }
        body = &body[skip..];
        if field == tag as u32 && wire == WireType::LengthDelimited {
            n += 1;
        }
    }
    n
}

/// Packs user records (partition key, data) into one aggregate, as the KPL does: what the
/// traffic generator's `--kpl` sends. Partition keys are kept once each in the table.
pub fn aggregate<'a>(records: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let mut message = AggregatedRecord::default();
    for (key, data) in records {
        let index = match message.partition_key_table.iter().position(|k| k == key) {
            Some(i) => i,
            None => {
                message.partition_key_table.push(key.to_owned());
                message.partition_key_table.len() - 1
            }
        };
        message.records.push(Record {
            partition_key_index: index as u64,
            explicit_hash_key_index: None,
            data: data.to_vec(),
            tags: Vec::new(),
        });
    }
    let body = message.encode_to_vec();
    let mut out = Vec::with_capacity(MAGIC.len() + body.len() + DIGEST_BYTES);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&body);
    out.extend_from_slice(&Md5::digest(&body));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SourcePosition;
    use proptest::prelude::*;

    fn input(data: Vec<u8>) -> InputRecord {
        InputRecord {
            position: SourcePosition {
                stream: "s".into(),
                shard: "shardId-000000000000".into(),
                sequence_number: "4960".into(),
                sub_sequence_number: None,
            },
            data,
            invalid_base64: None,
            arrival_ms: Some(7),
        }
    }

    fn reason(data: &[u8]) -> String {
        deaggregate(data).unwrap_err().detail
    }

    /// An aggregate made by hand from a message, with a correct trailer.
    fn framed(message: &AggregatedRecord) -> Vec<u8> {
        let body = message.encode_to_vec();
        [&MAGIC[..], &body, Md5::digest(&body).as_slice()].concat()
    }

    // Made by the reference implementation (aws-kinesis-agg 1.2.3, Python's `RecordAggregator`):
    // user records `{"x":1}` under key `pk1`, and `{"x":2}` under `pk2` with explicit hash key
    // `123`.
    const REFERENCE: &str = concat!(
        "f3899ac20a03706b310a03706b3212033132331a0b08001a077b2278223a317d1a0d080110001a077b",
        "2278223a327d7633bf43086c08d1c014c7518364b83c"
    );

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn an_aggregate_of_the_reference_library_unpacks_in_order() {
        let data = hex(REFERENCE);
        assert_eq!(
            deaggregate(&data).unwrap(),
            vec![br#"{"x":1}"#.to_vec(), br#"{"x":2}"#.to_vec()]
        );
    }

    #[test]
    fn plain_records_pass_as_they_are_and_user_records_get_sub_sequence_numbers() {
        let plain = input(br#"{"a":1}"#.to_vec());
        let got = user_records(3, &plain);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].index, got[0].record.as_ref()), (3, &plain));

        let agg = input(aggregate([("k", &b"one"[..]), ("k", b"two"), ("j", b"3")]));
        let got = user_records(5, &agg);
        let subs: Vec<_> = got
            .iter()
            .map(|u| {
                assert_eq!(u.index, 5);
                assert!(u.refused.is_none());
                assert_eq!(u.record.position.sequence_number, "4960");
                assert_eq!(u.record.arrival_ms, Some(7));
                (u.record.position.sub_sequence_number, u.record.data.clone())
            })
            .collect();
        assert_eq!(
            subs,
            vec![
                (Some(0), b"one".to_vec()),
                (Some(1), b"two".to_vec()),
                (Some(2), b"3".to_vec())
            ]
        );
    }

    #[test]
    fn an_unreadable_aggregate_is_refused_whole_with_its_reason() {
        let good = aggregate([("k", &b"{}"[..]), ("k", b"{}")]);
        // A wrong digest.
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(reason(&bad).contains("MD5"));
        // Truncated: the trailer no longer matches.
        assert!(reason(&good[..good.len() - 3]).contains("MD5"));
        assert!(reason(&MAGIC).contains("shorter"));
        // A truncated protobuf with a matching digest.
        let body = &good[4..good.len() - 16];
        let cut = &body[..body.len() - 1];
        let data = [&MAGIC[..], cut, Md5::digest(cut).as_slice()].concat();
        assert!(
            reason(&data).contains("does not decode"),
            "{}",
            reason(&data)
        );
        // Key indexes out of their tables.
        let mut m = AggregatedRecord::decode(body).unwrap();
        m.records[1].partition_key_index = 1;
        assert!(reason(&framed(&m)).contains("partition key index 1"));
        m.records[1].partition_key_index = 0;
        m.records[0].explicit_hash_key_index = Some(0);
        assert!(reason(&framed(&m)).contains("explicit hash key index 0"));
        // No user record; too many.
        assert!(reason(&framed(&AggregatedRecord::default())).contains("no user record"));
        let many = aggregate((0..=MAX_USER_RECORDS_PER_AGGREGATE).map(|_| ("k", &b"x"[..])));
        assert!(reason(&many).contains("more than"));

        let bad = input(bad);
        let refused = user_records(0, &bad);
        assert_eq!(refused.len(), 1);
        assert_eq!(
            refused[0].refused.as_ref().unwrap().reason,
            RejectReason::InvalidAggregate
        );
        assert!(matches!(refused[0].record, Cow::Borrowed(_)));
    }

    #[test]
    fn runs_keep_aggregates_whole_and_bound_the_user_records() {
        // Two full aggregates and one more record are more than a run may hold.
        assert_eq!(
            MAX_USER_RECORDS_IN_MEMORY,
            2 * MAX_USER_RECORDS_PER_AGGREGATE
        );
        let big = input(aggregate(
            (0..MAX_USER_RECORDS_PER_AGGREGATE).map(|_| ("k", &b"x"[..])),
        ));
        let plain = input(b"{}".to_vec());
        assert_eq!(user_record_count(&big), MAX_USER_RECORDS_PER_AGGREGATE);
        assert_eq!(user_record_count(&plain), 1);
        let batch = vec![plain.clone(), big.clone(), big.clone(), plain.clone(), big];
        assert_eq!(runs(&batch), vec![0..2, 2..4, 4..5]);
        assert_eq!(runs(&[]), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(runs(&[plain.clone(), plain]), vec![0..2]);
    }

    proptest! {
        #[test]
        fn what_is_aggregated_unpacks_to_the_same_records_and_counts_without_decoding(
            records in proptest::collection::vec(
                ("[a-z]{1,8}", proptest::collection::vec(any::<u8>(), 0..300)), 1..40),
        ) {
            let data = aggregate(records.iter().map(|(k, d)| (k.as_str(), d.as_slice())));
            prop_assert!(is_aggregate(&data));
            let back = deaggregate(&data).unwrap();
            prop_assert_eq!(&back, &records.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>());
            prop_assert_eq!(user_record_count(&input(data)), records.len());
        }

        #[test]
        fn no_bytes_after_the_magic_panic_or_pass_unchecked(
            tail in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let data = [&MAGIC[..], &tail].concat();
            // Random bytes almost never carry a matching digest; either way no panic, and a
            // result is either refused or a list of user records.
            let _ = deaggregate(&data);
            let _ = user_records(0, &input(data.clone()));
            let _ = runs(&[input(data)]);
        }
    }
}
