//! Redrive: puts the records of batches an event source mapping gave up on back on their
//! stream. Lambda's on-failure destination for Kinesis (an SQS queue in the template) gets only
//! a pointer to the batch (`KinesisBatchInfo`: stream, shard, first and last sequence number);
//! the records themselves stay in the stream for its retention. This reads each pointer, reads
//! that range from the stream, sends the records again with their partition keys, and deletes
//! the message once they are in. Both functions are idempotent, so records of the range that
//! were processed before the batch was given up come out as duplicates, not double counts.

use aws_sdk_kinesis::types::ShardIteratorType;
use serde_json::Value;

use crate::replay::StreamWriter;
use crate::LocalError;

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redriven {
    /// On-failure messages handled (and deleted).
    pub batches: u64,
    /// Records sent back to their streams.
    pub records: u64,
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
    let mut iterator = kinesis
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard)
        .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
        .starting_sequence_number(first)
        .send()
        .await
        .map_err(|e| LocalError::aws("Kinesis GetShardIterator", e))?
        .shard_iterator;
    let mut out = Vec::new();
    while let Some(it) = iterator {
        let page = kinesis
            .get_records()
            .shard_iterator(it)
            .limit(10_000)
            .send()
            .await
            .map_err(|e| LocalError::aws("Kinesis GetRecords", e))?;
        if page.records().is_empty() {
            break; // the range ends beyond what the shard holds (trimmed or never written)
        }
        for r in page.records() {
            if seq_cmp(r.sequence_number(), last).is_gt() {
                return Ok(out);
            }
            out.push((
                r.partition_key().unwrap_or("redrive").to_owned(),
                r.data().as_ref().to_vec(),
            ));
        }
        iterator = page.next_shard_iterator;
    }
    Ok(out)
}

/// Handles every message in the on-failure queue at `queue_url`.
pub async fn redrive(
    kinesis: &aws_sdk_kinesis::Client,
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
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
            let records = read_range(
                kinesis,
                &stream,
                &field("shardId")?,
                &field("startSequenceNumber")?,
                &field("endSequenceNumber")?,
            )
            .await?;
            StreamWriter::new(kinesis.clone(), &stream)
                .send_keyed(&records)
                .await?;
            tracing::info!(%stream, records = records.len(), "batch redriven");
            done.records += records.len() as u64;
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
}
