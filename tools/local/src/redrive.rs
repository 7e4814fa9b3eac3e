//! Redrive: puts the records of batches an event source mapping gave up on back on their
//! stream. Lambda's on-failure destination for Kinesis (an SQS queue in the template) gets only
//! a pointer to the batch (`KinesisBatchInfo`: stream, shard, first and last sequence number);
//! the records themselves stay in the stream for its retention. This reads each pointer, reads
//! that range from the stream, sends the records again with their partition keys, and deletes
//! the message once they are in. Both functions are idempotent, so records of the range that
//! were processed before the batch was given up come out as duplicates, not double counts.
//!
//! Records put back on the joined stream get new sequence numbers, so the enricher cannot
//! recognise their range; each is therefore flagged `recovered`
//! ([`adpipe_core::model::flag_recovered_bytes`]) and lands only where its key is absent, in
//! each table on its own (one may have committed the batch and the other not). Records of the
//! input streams are put back byte for byte: the joiner's state recognises them.

use serde_json::Value;

use crate::replay::StreamWriter;
use crate::stream_read::{ShardReader, Start};
use crate::LocalError;

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redriven {
    /// On-failure messages handled (and deleted).
    pub batches: u64,
    /// Records sent back to their streams.
    pub records: u64,
    /// Of those, joined-stream records flagged `recovered` on the way.
    pub flagged: u64,
}

/// Kinesis sequence numbers are decimal strings of up to 128 bits: compare them as numbers.
fn seq_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The records of one shard from `first` to `last` (both included): partition key and data.
pub async fn read_range(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    shard: &str,
    first: &str,
    last: &str,
) -> Result<Vec<(String, Vec<u8>)>, LocalError> {
    let mut reader =
        ShardReader::open(kinesis, stream, shard, Start::At(first), Some(10_000)).await?;
    let mut out = Vec::new();
    // Drained before `last`: the range ends beyond what the shard holds (trimmed or never
    // written).
    while let Some(page) = reader.next_records().await? {
        for r in page {
            if seq_cmp(r.sequence_number(), last).is_gt() {
                return Ok(out);
            }
            let key = r.partition_key.unwrap_or_else(|| "redrive".to_owned());
            out.push((key, r.data.into_inner()));
        }
    }
    Ok(out)
}

/// The records as they go back on `stream`: flagged `recovered` if it is the joined stream
/// (the enricher's input), unchanged otherwise. Returns how many were flagged.
pub fn prepare_for_stream(
    records: &mut [(String, Vec<u8>)],
    stream: &str,
    joined_stream: &str,
) -> u64 {
    if stream != joined_stream {
        return 0;
    }
    let mut flagged = 0;
    for (_, data) in records.iter_mut() {
        if let Some(marked) = adpipe_core::model::flag_recovered_bytes(data) {
            *data = marked;
            flagged += 1;
        }
    }
    flagged
}

/// Handles every message in the on-failure queue at `queue_url`. Records of `joined_stream`
/// are flagged `recovered` on the way back ([`prepare_for_stream`]).
pub async fn redrive(
    kinesis: &aws_sdk_kinesis::Client,
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    joined_stream: &str,
) -> Result<Redriven, LocalError> {
    let mut done = Redriven::default();
    loop {
        let received = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .visibility_timeout(60)
            .send()
            .await
            .map_err(|e| LocalError::aws("SQS ReceiveMessage", e))?;
        if received.messages().is_empty() {
            return Ok(done);
        }
        for m in received.messages() {
            let body: Value = serde_json::from_str(m.body().unwrap_or_default())
                .map_err(LocalError::json("an on-failure record"))?;
            let info = &body["KinesisBatchInfo"];
            let field = |k: &str| {
                info[k].as_str().map(str::to_owned).ok_or_else(|| {
                    LocalError::Runner(format!("on-failure record without KinesisBatchInfo.{k}"))
                })
            };
            let arn = field("streamArn")?;
            let stream = adpipe_core::config::stream_name(&arn).to_owned();
            let mut records = read_range(
                kinesis,
                &stream,
                &field("shardId")?,
                &field("startSequenceNumber")?,
                &field("endSequenceNumber")?,
            )
            .await?;
            let flagged = prepare_for_stream(&mut records, &stream, joined_stream);
            StreamWriter::new(kinesis.clone(), &stream)
                .send_keyed(&records)
                .await?;
            tracing::info!(%stream, records = records.len(), flagged, "batch redriven");
            done.records += records.len() as u64;
            done.flagged += flagged;
            done.batches += 1;
            if let Some(handle) = m.receipt_handle() {
                sqs.delete_message()
                    .queue_url(queue_url)
                    .receipt_handle(handle)
                    .send()
                    .await
                    .map_err(|e| LocalError::aws("SQS DeleteMessage", e))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_compare_as_numbers() {
        assert!(seq_cmp("9", "10").is_lt());
        assert!(seq_cmp(
            "49656853465235457112345678901234567890123456789010",
            "49656853465235457112345678901234567890123456789009"
        )
        .is_gt());
        assert!(seq_cmp("42", "42").is_eq());
    }

    #[test]
    fn only_joined_stream_records_are_flagged() {
        let joined =
            br#"{"type":"impression","schema_version":1,"recovered":false,"impression_id":"i"}"#;
        let raw = br#"{"impression_id":"i","type":"impression"}"#;
        let records = || {
            vec![
                ("i".to_owned(), joined.to_vec()),
                ("i".to_owned(), b"garbage".to_vec()),
            ]
        };
        let mut input = vec![("i".to_owned(), raw.to_vec())];
        assert_eq!(prepare_for_stream(&mut input, "impressions", "joined"), 0);
        assert_eq!(input[0].1, raw.to_vec(), "input streams: byte for byte");

        let mut out = records();
        assert_eq!(prepare_for_stream(&mut out, "joined", "joined"), 1);
        let v: Value = serde_json::from_slice(&out[0].1).unwrap();
        assert_eq!(v["recovered"], true);
        assert_eq!(out[0].0, "i", "the partition key is kept");
        assert_eq!(out[1].1, b"garbage".to_vec());
    }
}
