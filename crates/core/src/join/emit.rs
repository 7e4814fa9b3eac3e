//! Emission to an output stream: split into requests within Kinesis' `PutRecords` limits and
//! retry only the entries that failed, with exponential backoff.

use std::ops::Range;
use std::time::Duration;

use crate::ports::{EntryResult, OutRecord, PortError, RecordSink};

/// Kinesis `PutRecords`: at most 500 records per request.
pub const MAX_RECORDS_PER_PUT: usize = 500;
/// Kinesis `PutRecords`: at most 5 MiB per request, data and partition keys included.
pub const MAX_BYTES_PER_PUT: usize = 5 * 1024 * 1024;

/// Bounded retries for the entries a put did not accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts per entry, the first included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt` (1-based; attempt 1 has none): exponential, capped.
    pub fn delay_before(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (attempt - 2).min(16);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// Splits records (given by their sizes) into consecutive request ranges within both limits.
pub fn request_ranges(sizes: &[usize]) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && (i - start == MAX_RECORDS_PER_PUT || bytes + size > MAX_BYTES_PER_PUT) {
            ranges.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < sizes.len() {
        ranges.push(start..sizes.len());
    }
    ranges
}

fn request_size(r: &OutRecord) -> usize {
    r.data.len() + r.partition_key.len()
}

/// What happened to each record, and how much retrying it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmitReport {
    /// `None` if accepted, else the last error for that record.
    pub errors: Vec<Option<String>>,
    pub requests: u32,
    pub retried_entries: u32,
}

/// Sends every record, retrying only failed entries, up to the policy's attempts.
///
/// `PutRecords` is not idempotent. A request that failed without an answer per entry (a 5xx, a
/// timeout, a lost response: [`PortError::Unavailable`]) may have been written, so its records
/// are re-sent as `resend_maybe_written(record)` (the joiner flags them `recovered`, and the
/// lake lands a flagged record only if its key is absent). A throttled or refused request, and
/// an entry the response marks failed, were not written: they are re-sent as they are.
pub async fn send_all<S: RecordSink>(
    sink: &S,
    records: &[OutRecord],
    policy: &RetryPolicy,
    resend_maybe_written: impl Fn(&OutRecord) -> OutRecord,
) -> EmitReport {
    let mut records: Vec<OutRecord> = records.to_vec();
    let mut errors: Vec<Option<String>> = vec![None; records.len()];
    let mut pending: Vec<usize> = (0..records.len()).collect();
    let mut requests = 0;
    let mut retried_entries = 0;
    for attempt in 1..=policy.max_attempts.max(1) {
        if pending.is_empty() {
            break;
        }
        if attempt > 1 {
            retried_entries += pending.len() as u32;
            tokio::time::sleep(policy.delay_before(attempt)).await;
        }
        let batch: Vec<OutRecord> = pending.iter().map(|&i| records[i].clone()).collect();
        let sizes: Vec<usize> = batch.iter().map(request_size).collect();
        let mut still_failed = Vec::new();
        for range in request_ranges(&sizes) {
            requests += 1;
            let slice = &batch[range.clone()];
            match sink.put_records(slice).await {
                Ok(results) if results.len() == slice.len() => {
                    for (offset, result) in results.into_iter().enumerate() {
                        let idx = pending[range.start + offset];
                        match result {
                            EntryResult::Accepted => errors[idx] = None,
                            EntryResult::Failed { code, message } => {
                                errors[idx] = Some(format!("{code}: {message}"));
                                still_failed.push(idx);
                            }
                        }
                    }
                }
                Ok(results) => {
                    let msg = format!(
                        "output stream answered {} results for {} records",
                        results.len(),
                        slice.len()
                    );
                    for offset in range.clone() {
                        let idx = pending[offset];
                        errors[idx] = Some(msg.clone());
                        records[idx] = resend_maybe_written(&records[idx]);
                        still_failed.push(idx);
                    }
                }
                Err(e) => {
                    let maybe_written = matches!(e, PortError::Unavailable(_));
                    for offset in range.clone() {
                        let idx = pending[offset];
                        errors[idx] = Some(e.to_string());
                        if maybe_written {
                            records[idx] = resend_maybe_written(&records[idx]);
                        }
                        still_failed.push(idx);
                    }
                }
            }
        }
        pending = still_failed;
    }
    EmitReport {
        errors,
        requests,
        retried_entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::PortError;
    use std::sync::Mutex;

    #[test]
    fn ranges_respect_the_record_count_limit() {
        let ranges = request_ranges(&vec![10; 1201]);
        assert_eq!(ranges, vec![0..500, 500..1000, 1000..1201]);
    }

    #[test]
    fn ranges_respect_the_byte_limit() {
        let mib = 1024 * 1024;
        let ranges = request_ranges(&[mib, mib, mib, mib, mib, 1, mib]);
        assert_eq!(ranges, vec![0..5, 5..7]);
        assert_eq!(request_ranges(&[]), Vec::<Range<usize>>::new());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay_before(1), Duration::ZERO);
        assert_eq!(p.delay_before(2), Duration::from_millis(50));
        assert_eq!(p.delay_before(3), Duration::from_millis(100));
        assert_eq!(p.delay_before(30), Duration::from_secs(2));
    }

    /// Fails chosen partition keys a given number of times, and records every request.
    struct Flaky {
        failures_left: Mutex<std::collections::HashMap<String, u32>>,
        requests: Mutex<Vec<Vec<String>>>,
    }

    impl RecordSink for Flaky {
        async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<EntryResult>, PortError> {
            self.requests
                .lock()
                .unwrap()
                .push(records.iter().map(|r| r.partition_key.clone()).collect());
            let mut left = self.failures_left.lock().unwrap();
            Ok(records
                .iter()
                .map(|r| match left.get_mut(&r.partition_key) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        EntryResult::Failed {
                            code: "ProvisionedThroughputExceededException".into(),
                            message: "slow down".into(),
                        }
                    }
                    _ => EntryResult::Accepted,
                })
                .collect())
        }
    }

    fn rec(k: &str) -> OutRecord {
        OutRecord {
            partition_key: k.into(),
            data: k.as_bytes().to_vec(),
            explicit_hash_key: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_failed_entries_are_retried() {
        let sink = Flaky {
            failures_left: Mutex::new([("b".to_string(), 2)].into()),
            requests: Mutex::new(Vec::new()),
        };
        let report = send_all(
            &sink,
            &[rec("a"), rec("b"), rec("c")],
            &RetryPolicy::default(),
            |r| panic!("{r:?} was refused per entry, so it was not written"),
        )
        .await;
        assert_eq!(report.errors, vec![None, None, None]);
        assert_eq!(
            *sink.requests.lock().unwrap(),
            vec![vec!["a", "b", "c"], vec!["b"], vec!["b"]]
        );
        assert_eq!(report.retried_entries, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_failing_every_attempt_are_reported() {
        let sink = Flaky {
            failures_left: Mutex::new([("b".to_string(), 99)].into()),
            requests: Mutex::new(Vec::new()),
        };
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let report = send_all(&sink, &[rec("a"), rec("b")], &policy, Clone::clone).await;
        assert_eq!(report.errors[0], None);
        assert!(report.errors[1]
            .as_deref()
            .unwrap()
            .starts_with("ProvisionedThroughput"));
        assert_eq!(report.requests, 3);
    }

    /// Fails whole requests: first without an answer (maybe written), then throttled.
    struct Unanswered {
        errors: Mutex<Vec<PortError>>,
        requests: Mutex<Vec<Vec<String>>>,
    }

    impl RecordSink for Unanswered {
        async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<EntryResult>, PortError> {
            self.requests.lock().unwrap().push(
                records
                    .iter()
                    .map(|r| String::from_utf8(r.data.clone()).unwrap())
                    .collect(),
            );
            match self.errors.lock().unwrap().pop() {
                Some(e) => Err(e),
                None => Ok(vec![EntryResult::Accepted; records.len()]),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_may_have_been_written_is_resent_flagged() {
        let sink = Unanswered {
            // popped from the end: a lost response, then a throttle, then success
            errors: Mutex::new(vec![
                PortError::Throttled("slow down".into()),
                PortError::Unavailable("500 after the write".into()),
            ]),
            requests: Mutex::new(Vec::new()),
        };
        let flag = |r: &OutRecord| OutRecord {
            partition_key: r.partition_key.clone(),
            data: [r.data.as_slice(), b"+recovered"].concat(),
            explicit_hash_key: None,
        };
        let report = send_all(&sink, &[rec("a"), rec("b")], &RetryPolicy::default(), flag).await;
        assert_eq!(report.errors, vec![None, None]);
        assert_eq!(
            *sink.requests.lock().unwrap(),
            vec![
                vec!["a", "b"],
                vec!["a+recovered", "b+recovered"],
                // A throttled request was not written: flagged once, not twice.
                vec!["a+recovered", "b+recovered"],
            ]
        );
    }
}
