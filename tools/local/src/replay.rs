//! Raw records into the input streams: JSONL files (one record per line, bytes kept as they
//! are, malformed lines included) and generated traffic, sent with `PutRecords` the way a
//! producer does (≤ 500 records and ≤ 5 MiB per request, refused entries sent again).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;

use crate::progress::Counter;
use crate::LocalError;

/// `PutRecords` limits.
pub const MAX_RECORDS_PER_PUT: usize = 500;
pub const MAX_BYTES_PER_PUT: usize = 5 * 1024 * 1024;
/// Attempts per record when `PutRecords` refuses some entries (throttling).
pub const PUT_ATTEMPTS: u32 = 10;

/// In which order the two streams receive their records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Order {
    /// Both streams at once, each in its file's order (as two producers would).
    Interleaved,
    /// Every click is sent (and, when the pipeline runs, processed) before any impression.
    ClicksFirst,
}

/// Splits JSONL bytes into records: one per line, bytes unchanged (a `\r` before the newline
/// stays, it is JSON whitespace). A blank line is a record too (an empty one, which the
/// joiner dead-letters); only the empty tail after the final newline is not.
pub fn parse_jsonl(bytes: &[u8]) -> Vec<Vec<u8>> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    body.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
}

/// Records as JSONL. A record containing a newline cannot be one line: refused.
pub fn to_jsonl(records: &[Vec<u8>]) -> Result<Vec<u8>, usize> {
    let mut out = Vec::with_capacity(records.iter().map(|r| r.len() + 1).sum());
    for (i, r) in records.iter().enumerate() {
        if r.contains(&b'\n') {
            return Err(i);
        }
        out.extend_from_slice(r);
        out.push(b'\n');
    }
    Ok(out)
}

/// Reads a JSONL file of raw records.
pub fn read_jsonl(path: &Path) -> Result<Vec<Vec<u8>>, LocalError> {
    let bytes = std::fs::read(path).map_err(LocalError::io("reading a JSONL file"))?;
    Ok(parse_jsonl(&bytes))
}

/// Writes raw records as a JSONL file.
pub fn write_jsonl(path: &Path, records: &[Vec<u8>]) -> Result<(), LocalError> {
    let bytes = to_jsonl(records).map_err(|i| LocalError::Io {
        context: "writing a JSONL file",
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("record {i} contains a newline"),
        ),
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(LocalError::io("creating the output directory"))?;
    }
    std::fs::write(path, bytes).map_err(LocalError::io("writing a JSONL file"))
}

/// The KPL's default `AggregationMaxSize`: a producer closes an aggregate before it passes it.
pub const KPL_MAX_AGGREGATE_BYTES: usize = 51_200;

/// Records packed as the Kinesis Producer Library packs them: runs of up to `per_aggregate`
/// user records (each under its own partition key) in one KPL-aggregated record of at most
/// [`KPL_MAX_AGGREGATE_BYTES`]. A run of one (the last, or a record too big to share) is sent
/// plain, as the KPL sends it.
pub fn kpl_aggregates(records: &[Vec<u8>], per_aggregate: usize) -> Vec<Vec<u8>> {
    // Upper bounds of what a user record adds to an aggregate: its data, its partition key in
    // the table, and at most 12 bytes of protobuf framing; the magic and the MD5 trailer add 20.
    let size = |data: &[u8], key: &str| data.len() + 12 + key.len() + 3;
    let mut out = Vec::new();
    let mut run: Vec<(String, &[u8])> = Vec::new();
    let mut bytes = 20;
    let flush = |run: &mut Vec<(String, &[u8])>, out: &mut Vec<Vec<u8>>| match run.len() {
        0 => {}
        1 => out.push(run.pop().expect("one record").1.to_vec()),
        _ => {
            out.push(adpipe_core::kpl::aggregate(
                run.iter().map(|(k, d)| (k.as_str(), *d)),
            ));
            run.clear();
        }
    };
    for data in records {
        let key = partition_key(data);
        let add = size(data, &key);
        if run.len() >= per_aggregate.max(1) || bytes + add > KPL_MAX_AGGREGATE_BYTES {
            flush(&mut run, &mut out);
            bytes = 20;
        }
        bytes += add;
        run.push((key, data));
    }
    flush(&mut run, &mut out);
    out
}

/// The partition key a producer would use: the record's `impression_id` (so an impression and
/// its clicks hash alike), or a digest of the bytes for records that have none.
pub fn partition_key(data: &[u8]) -> String {
    let id = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.get("impression_id")?.as_str().map(str::to_owned))
        .filter(|id| !id.trim().is_empty() && id.chars().count() <= 256);
    id.unwrap_or_else(|| {
        // FNV-1a: stable everywhere, and enough to spread malformed records over shards.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in data {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("raw-{h:016x}")
    })
}

/// Cuts records into `PutRecords` requests (count and size limits; the size counts data and
/// partition keys, as Kinesis does).
pub fn chunks(records: &[(String, Vec<u8>)], max_records: usize) -> Vec<std::ops::Range<usize>> {
    let max_records = max_records.clamp(1, MAX_RECORDS_PER_PUT);
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0usize, 0usize);
    for (i, (key, data)) in records.iter().enumerate() {
        let len = key.len() + data.len();
        if i > start && (i - start == max_records || bytes + len > MAX_BYTES_PER_PUT) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += len;
    }
    if start < records.len() {
        out.push(start..records.len());
    }
    out
}

/// A producer for one stream.
#[derive(Debug, Clone)]
pub struct StreamWriter {
    client: Client,
    stream: String,
    /// Records per second at most; `None` sends as fast as the endpoint takes them.
    pub rate: Option<f64>,
}

impl StreamWriter {
    pub fn new(client: Client, stream: impl Into<String>) -> Self {
        StreamWriter {
            client,
            stream: stream.into(),
            rate: None,
        }
    }

    /// Sends `records` in order; `sent` counts accepted records.
    pub async fn send(&self, records: &[Vec<u8>], sent: &Counter) -> Result<(), LocalError> {
        let keyed: Vec<(String, Vec<u8>)> = records
            .iter()
            .map(|r| (partition_key(r), r.clone()))
            .collect();
        // Rate-limited sends go in small requests, so the pace is smooth.
        let per_request = match self.rate {
            Some(rate) => ((rate / 10.0).ceil() as usize).max(1),
            None => MAX_RECORDS_PER_PUT,
        };
        let started = Instant::now();
        let mut accepted = 0u64;
        for range in chunks(&keyed, per_request) {
            let n = range.len() as u64;
            self.put_all(&keyed[range]).await?;
            accepted += n;
            sent.add(n);
            if let Some(rate) = self.rate.filter(|r| *r > 0.0) {
                let due = Duration::from_secs_f64(accepted as f64 / rate);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Ok(())
    }

    /// Sends records with the partition keys they had (a redrive), in requests of 500.
    pub async fn send_keyed(&self, records: &[(String, Vec<u8>)]) -> Result<(), LocalError> {
        for range in chunks(records, MAX_RECORDS_PER_PUT) {
            self.put_all(&records[range]).await?;
        }
        Ok(())
    }

    /// One request's records, with the refused entries sent again (backing off) until all are
    /// in. The retried entries land after the accepted ones, as with a real producer.
    async fn put_all(&self, records: &[(String, Vec<u8>)]) -> Result<(), LocalError> {
        let mut pending: Vec<&(String, Vec<u8>)> = records.iter().collect();
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=PUT_ATTEMPTS {
            let entries = pending
                .iter()
                .map(|(key, data)| {
                    // A keyed record or a joined pack goes back on its bucket's shard; any
                    // other record where its partition key puts it, as when first put.
                    PutRecordsRequestEntry::builder()
                        .partition_key(key)
                        .set_explicit_hash_key(adpipe_core::join::router::home_hash_key(data))
                        .data(Blob::new(data.clone()))
                        .build()
                        .map_err(|e| LocalError::aws("Kinesis PutRecords entry", e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = match self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(entries))
                .send()
                .await
            {
                Ok(out) => out,
                Err(e) if attempt < PUT_ATTEMPTS => {
                    tracing::warn!(stream = %self.stream, attempt, error = %aws_smithy_types::error::display::DisplayErrorContext(&e), "PutRecords failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    continue;
                }
                Err(e) => return Err(LocalError::aws("Kinesis PutRecords", e)),
            };
            let results = out.records();
            if results.len() != pending.len() {
                return Err(LocalError::Runner(format!(
                    "PutRecords answered {} entries for {}",
                    results.len(),
                    pending.len()
                )));
            }
            pending = pending
                .into_iter()
                .zip(results)
                .filter(|(_, r)| r.error_code().is_some())
                .map(|(p, _)| p)
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        Err(LocalError::NotAccepted {
            stream: self.stream.clone(),
            refused: pending.len(),
            attempts: PUT_ATTEMPTS,
        })
    }
}

/// Sends impressions and clicks to their streams in the given order. With
/// [`Order::ClicksFirst`] the impressions are sent only after every click is in.
pub async fn send_both(
    impressions: &StreamWriter,
    clicks: &StreamWriter,
    impression_records: &[Vec<u8>],
    click_records: &[Vec<u8>],
    order: Order,
    counters: &(Arc<Counter>, Arc<Counter>),
) -> Result<(), LocalError> {
    match order {
        Order::Interleaved => {
            let (a, b) = futures::join!(
                impressions.send(impression_records, &counters.0),
                clicks.send(click_records, &counters.1)
            );
            a.and(b)
        }
        Order::ClicksFirst => {
            clicks.send(click_records, &counters.1).await?;
            impressions.send(impression_records, &counters.0).await
        }
    }
}

/// Sends raw records to two streams. `rate` (records/s) is for both streams together,
/// shared in proportion to their records. `counters` count accepted records.
#[allow(clippy::too_many_arguments)]
pub async fn send_rated(
    client: &Client,
    impressions_stream: &str,
    clicks_stream: &str,
    impressions: &[Vec<u8>],
    clicks: &[Vec<u8>],
    order: Order,
    rate: Option<f64>,
    counters: &(Arc<Counter>, Arc<Counter>),
) -> Result<(), LocalError> {
    let total = (impressions.len() + clicks.len()).max(1) as f64;
    let mut w_imps = StreamWriter::new(client.clone(), impressions_stream);
    let mut w_clicks = StreamWriter::new(client.clone(), clicks_stream);
    w_imps.rate = rate.map(|r| r * impressions.len() as f64 / total);
    w_clicks.rate = rate.map(|r| r * clicks.len() as f64 / total);
    send_both(&w_imps, &w_clicks, impressions, clicks, order, counters).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_keeps_every_line_and_its_bytes() {
        let file = b"{\"a\":1}\r\nnot json\n\n\xff\xfe\n{\"b\":2}";
        let records = parse_jsonl(file);
        assert_eq!(
            records,
            vec![
                b"{\"a\":1}\r".to_vec(),
                b"not json".to_vec(),
                Vec::new(),
                b"\xff\xfe".to_vec(),
                b"{\"b\":2}".to_vec()
            ]
        );
        // A trailing newline ends the last record; it does not add an empty one.
        assert_eq!(parse_jsonl(b"x\ny\n").len(), 2);
        assert!(parse_jsonl(b"").is_empty());
        let round = to_jsonl(&records).unwrap();
        assert_eq!(parse_jsonl(&round), records);
        assert_eq!(to_jsonl(&[b"a\nb".to_vec()]), Err(0));
    }

    #[test]
    fn kpl_aggregates_hold_every_record_once_in_order_within_the_size_limit() {
        let records: Vec<Vec<u8>> = (0..250)
            .map(|i| {
                let pad = "x".repeat(if i % 50 == 7 { 30_000 } else { i * 7 });
                format!(r#"{{"impression_id":"imp-{i}","pad":"{pad}"}}"#).into_bytes()
            })
            .collect();
        for per in [1, 2, 10, 1_000] {
            let sent = kpl_aggregates(&records, per);
            let mut back = Vec::new();
            for r in &sent {
                assert!(
                    r.len() <= KPL_MAX_AGGREGATE_BYTES.max(31_000),
                    "{}",
                    r.len()
                );
                if adpipe_core::kpl::is_aggregate(r) {
                    assert!(r.len() <= KPL_MAX_AGGREGATE_BYTES);
                    let users = adpipe_core::kpl::deaggregate(r).unwrap();
                    assert!(
                        users.len() >= 2 && users.len() <= per,
                        "{per}: {}",
                        users.len()
                    );
                    back.extend(users);
                } else {
                    back.push(r.clone());
                }
            }
            assert_eq!(back, records, "per {per}");
            if per == 1 {
                assert_eq!(sent, records, "one per aggregate is plain records");
            }
        }
    }

    #[test]
    fn partition_keys_follow_the_impression_id_or_the_bytes() {
        assert_eq!(partition_key(br#"{"impression_id":"imp-1"}"#), "imp-1");
        let a = partition_key(b"garbage");
        assert!(a.starts_with("raw-"));
        assert_eq!(a, partition_key(b"garbage"));
        assert_ne!(a, partition_key(b"garbage2"));
        assert!(partition_key(br#"{"impression_id":""}"#).starts_with("raw-"));
        assert!(partition_key(br#"{"impression_id":7}"#).starts_with("raw-"));
    }

    #[test]
    fn requests_respect_count_and_size_limits() {
        let small: Vec<(String, Vec<u8>)> =
            (0..1_201).map(|_| ("k".into(), vec![b'x'; 10])).collect();
        let c = chunks(&small, 500);
        assert_eq!(c, vec![0..500, 500..1_000, 1_000..1_201]);
        let big: Vec<(String, Vec<u8>)> = (0..12)
            .map(|_| ("k".into(), vec![b'x'; 1024 * 1024]))
            .collect();
        let c = chunks(&big, 500);
        assert!(c.iter().all(|r| r.len() <= 4), "{c:?}");
        assert_eq!(c.iter().map(|r| r.len()).sum::<usize>(), 12);
        assert_eq!(chunks(&[], 500), Vec::<std::ops::Range<usize>>::new());
    }
}
