//! Lambda's Kinesis event source mapping (ESM) as pure decisions, with no I/O: which records go
//! into the next batch, and what a batch's outcome does to the shard (checkpoint, retry from the
//! first failed record, bisect, or give up and discard to the on-failure destination).
//!
//! The rules follow Lambda's documentation for Kinesis event source mappings:
//! - a batch is at most `BatchSize` records and at most the 6 MB invocation payload; with a
//!   `MaximumBatchingWindowInSeconds` Lambda gathers records until the batch is full or the window
//!   has passed, with no window it invokes with what it has;
//! - one batch per shard at a time, in sequence order; a shard is blocked while its failed batch
//!   is retried;
//! - with `ReportBatchItemFailures`, the response's `batchItemFailures` checkpoints at the lowest
//!   reported sequence number and retries from there; an empty or absent list is success; a null,
//!   empty or unknown `itemIdentifier` fails the whole batch; without the setting the response is
//!   ignored;
//! - a function error (an unhandled error, a crash or a timeout) retries the whole batch, or with
//!   `BisectBatchOnFunctionError` splits it in two and retries the halves in order; splitting does
//!   not consume the retry quota, each other retry does (`MaximumRetryAttempts`, -1 = unbounded);
//! - when the quota is used up the remaining records are discarded: the shard moves on and the
//!   on-failure destination gets a record describing them.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::Value;

/// The synchronous invocation payload limit (6 MB).
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;
/// `BatchSize` limits for Kinesis.
pub const MAX_BATCH_SIZE: usize = 10_000;
/// `MaximumBatchingWindowInSeconds` limit.
pub const MAX_BATCHING_WINDOW: Duration = Duration::from_secs(300);
/// `MaximumRetryAttempts` limit.
pub const MAX_RETRY_ATTEMPTS: u32 = 10_000;

/// Where a mapping starts reading a shard that has no checkpoint yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartingPosition {
    TrimHorizon,
    Latest,
}

/// One event source mapping's settings, named after the `AWS::Lambda::EventSourceMapping`
/// properties they stand for.
#[derive(Debug, Clone, PartialEq)]
pub struct EsmSettings {
    /// `BatchSize`.
    pub batch_size: usize,
    /// `MaximumBatchingWindowInSeconds`.
    pub batching_window: Duration,
    /// `MaximumRetryAttempts`; `None` is -1 (retry until the record expires).
    pub max_retry_attempts: Option<u32>,
    /// `BisectBatchOnFunctionError`.
    pub bisect_on_error: bool,
    /// `FunctionResponseTypes: [ReportBatchItemFailures]`.
    pub report_batch_item_failures: bool,
    /// `StartingPosition`.
    pub starting_position: StartingPosition,
    /// The function's `Timeout`: a longer invocation is a function error.
    pub function_timeout: Duration,
    /// The invocation payload limit; Lambda's is [`MAX_PAYLOAD_BYTES`].
    pub max_payload_bytes: usize,
    /// Pause before a retry. Lambda's own pacing is unpublished; locally it only keeps a
    /// failing dependency from being hammered.
    pub retry_delay: Duration,
}

impl Default for EsmSettings {
    /// Lambda's defaults for a Kinesis mapping, except `ReportBatchItemFailures`, which both
    /// adpipe functions need.
    fn default() -> Self {
        EsmSettings {
            batch_size: 100,
            batching_window: Duration::ZERO,
            max_retry_attempts: None,
            bisect_on_error: false,
            report_batch_item_failures: true,
            starting_position: StartingPosition::TrimHorizon,
            function_timeout: Duration::from_secs(3),
            max_payload_bytes: MAX_PAYLOAD_BYTES,
            retry_delay: Duration::from_millis(200),
        }
    }
}

/// A setting outside the range Lambda accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event source mapping setting {setting} = {value} is outside Lambda's range {range}")]
pub struct InvalidSetting {
    pub setting: &'static str,
    pub value: String,
    pub range: &'static str,
}

impl EsmSettings {
    /// Checks the settings against the ranges `CreateEventSourceMapping` accepts.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return Err(InvalidSetting {
                setting: "BatchSize",
                value: self.batch_size.to_string(),
                range: "1..=10000",
            });
        }
        if self.batching_window > MAX_BATCHING_WINDOW {
            return Err(InvalidSetting {
                setting: "MaximumBatchingWindowInSeconds",
                value: self.batching_window.as_secs().to_string(),
                range: "0..=300",
            });
        }
        if self
            .max_retry_attempts
            .is_some_and(|n| n > MAX_RETRY_ATTEMPTS)
        {
            return Err(InvalidSetting {
                setting: "MaximumRetryAttempts",
                value: format!("{:?}", self.max_retry_attempts),
                range: "-1..=10000",
            });
        }
        if self.max_payload_bytes == 0 || self.function_timeout.is_zero() {
            return Err(InvalidSetting {
                setting: "payload limit / Timeout",
                value: "0".into(),
                range: "> 0",
            });
        }
        Ok(())
    }

    fn may_retry(&self, retries: u32) -> bool {
        self.max_retry_attempts.is_none_or(|max| retries < max)
    }
}

/// What the mapping needs to know about a record.
pub trait BatchRecord {
    fn sequence_number(&self) -> &str;
    /// The record's share of the invocation payload, in bytes.
    fn payload_len(&self) -> usize;
}

/// Why an invocation did not return a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FunctionError {
    /// The handler returned an error (`functionError: Unhandled`).
    #[error("function error: {0}")]
    Unhandled(String),
    /// The invocation ran past the function timeout.
    #[error("function timed out after {0:?}")]
    Timeout(Duration),
    /// The execution environment died (a panic, `Runtime.ExitError`).
    #[error("function crashed: {0}")]
    Crashed(String),
    /// The execution environment could not be initialised (`Runtime.InitError`).
    #[error("function init failed: {0}")]
    Init(String),
}

/// How Lambda reads an invocation's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Records from `first_failed` on must be retried; the ones before it are done.
    PartialFailure {
        first_failed: usize,
    },
    /// The response was unusable as a partial-batch response: the whole batch failed.
    InvalidResponse {
        reason: String,
    },
    /// The invocation itself failed.
    FunctionError(FunctionError),
}

/// Reads an invocation result the way Lambda does. `sequence_numbers` are the batch's, in order.
pub fn judge(
    settings: &EsmSettings,
    sequence_numbers: &[&str],
    result: &Result<Value, FunctionError>,
) -> Outcome {
    let response = match result {
        Err(e) => return Outcome::FunctionError(e.clone()),
        Ok(v) => v,
    };
    if !settings.report_batch_item_failures {
        return Outcome::Success;
    }
    let failures = match response.get("batchItemFailures") {
        None | Some(Value::Null) => return Outcome::Success,
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Outcome::InvalidResponse {
                reason: format!("batchItemFailures is not a list: {other}"),
            }
        }
    };
    let mut lowest: Option<usize> = None;
    for item in failures {
        let id = match item.get("itemIdentifier") {
            Some(Value::String(s)) if !s.is_empty() => s,
            other => {
                return Outcome::InvalidResponse {
                    reason: format!("itemIdentifier is null, empty or missing: {other:?}"),
                }
            }
        };
        // Sequence numbers grow along the shard, so the lowest one is the earliest position.
        match sequence_numbers.iter().position(|s| s == id) {
            Some(i) => lowest = Some(lowest.map_or(i, |l| l.min(i))),
            None => {
                return Outcome::InvalidResponse {
                    reason: format!("itemIdentifier {id} is not in the batch"),
                }
            }
        }
    }
    match lowest {
        None => Outcome::Success,
        Some(i) => Outcome::PartialFailure { first_failed: i },
    }
}

/// One batch handed to the function, with its retry history.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt<R> {
    pub records: Vec<R>,
    /// Retries this batch has consumed from `MaximumRetryAttempts`.
    pub retries: u32,
    /// Invocations of these records so far (for the on-failure record's `approximateInvokeCount`).
    pub invocations: u32,
    /// Whether this is a retry or a bisected half, i.e. these records were delivered before.
    pub redelivery: bool,
}

impl<R> Attempt<R> {
    fn fresh(records: Vec<R>) -> Self {
        Attempt {
            records,
            retries: 0,
            invocations: 0,
            redelivery: false,
        }
    }
}

/// Why records were discarded (the on-failure record's `requestContext.condition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardCondition {
    RetryAttemptsExhausted,
}

impl DiscardCondition {
    pub fn as_str(self) -> &'static str {
        match self {
            DiscardCondition::RetryAttemptsExhausted => "RetryAttemptsExhausted",
        }
    }
}

/// What a completed invocation did to the shard.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion<R> {
    /// `processed` records are done; the checkpoint moved past them.
    Checkpointed { processed: usize },
    /// `processed` records are done and the rest is queued again (one retry consumed).
    Retrying { processed: usize, retried: usize },
    /// The batch was split in two after a function error (no retry consumed).
    Bisected {
        first_half: usize,
        second_half: usize,
    },
    /// Retries are used up: `records` are skipped; `processed` earlier ones were done.
    Discarded {
        processed: usize,
        attempt: Attempt<R>,
        condition: DiscardCondition,
        function_error: Option<FunctionError>,
    },
}

/// What the shard's poller should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step<R> {
    /// Invoke the function with this batch now.
    Invoke(Attempt<R>),
    /// Read more records. A batch is due by `invoke_by_ms` (the batching window) if records
    /// are already gathered, otherwise there is nothing to invoke.
    Gather { invoke_by_ms: Option<u64> },
}

/// One shard's mapping state: gathered records, queued retries, and the checkpoint.
#[derive(Debug, Clone)]
pub struct ShardState<R> {
    settings: EsmSettings,
    buffer: VecDeque<R>,
    gathering_since_ms: Option<u64>,
    /// Failed work, redone before anything new (the shard is blocked meanwhile).
    retries: VecDeque<Attempt<R>>,
    checkpoint: Option<String>,
}

impl<R: BatchRecord + Clone> ShardState<R> {
    pub fn new(settings: EsmSettings, checkpoint: Option<String>) -> Self {
        ShardState {
            settings,
            buffer: VecDeque::new(),
            gathering_since_ms: None,
            retries: VecDeque::new(),
            checkpoint,
        }
    }

    pub fn settings(&self) -> &EsmSettings {
        &self.settings
    }

    /// The sequence number of the last record that is done (processed or discarded).
    pub fn checkpoint(&self) -> Option<&str> {
        self.checkpoint.as_deref()
    }

    /// Records read but not yet handed to the function.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Nothing gathered and nothing to retry.
    pub fn is_idle(&self) -> bool {
        self.buffer.is_empty() && self.retries.is_empty()
    }

    /// Adds records read from the shard (in sequence order).
    pub fn push_records(&mut self, records: impl IntoIterator<Item = R>, now_ms: u64) {
        let before = self.buffer.len();
        self.buffer.extend(records);
        if before == 0 && !self.buffer.is_empty() {
            self.gathering_since_ms = Some(now_ms);
        }
    }

    /// How many buffered records the next batch takes: at most `BatchSize`, within the payload
    /// limit (a single oversized record still goes alone; Kinesis caps records at 1 MB anyway).
    /// The flag says whether the batch is full (count or payload).
    fn batch_len(&self) -> (usize, bool) {
        let mut bytes = 0usize;
        let mut n = 0usize;
        for r in self.buffer.iter().take(self.settings.batch_size) {
            let len = r.payload_len();
            if n > 0 && bytes + len > self.settings.max_payload_bytes {
                return (n, true);
            }
            bytes += len;
            n += 1;
        }
        (n, n == self.settings.batch_size)
    }

    /// The next thing to do at `now_ms`.
    pub fn next_step(&mut self, now_ms: u64) -> Step<R> {
        if let Some(retry) = self.retries.pop_front() {
            return Step::Invoke(retry);
        }
        if self.buffer.is_empty() {
            return Step::Gather { invoke_by_ms: None };
        }
        let (n, full) = self.batch_len();
        let window = self.settings.batching_window.as_millis() as u64;
        let since = self.gathering_since_ms.unwrap_or(now_ms);
        if full || window == 0 || now_ms >= since.saturating_add(window) {
            let records: Vec<R> = self.buffer.drain(..n).collect();
            // Records left over were read already: the next window starts now.
            self.gathering_since_ms = (!self.buffer.is_empty()).then_some(now_ms);
            return Step::Invoke(Attempt::fresh(records));
        }
        Step::Gather {
            invoke_by_ms: Some(since.saturating_add(window)),
        }
    }

    fn done_through(&mut self, record: Option<&R>) {
        if let Some(r) = record {
            self.checkpoint = Some(r.sequence_number().to_owned());
        }
    }

    /// Applies an invocation's outcome. `attempt` is the batch that was invoked.
    pub fn complete(&mut self, mut attempt: Attempt<R>, outcome: Outcome) -> Completion<R> {
        attempt.invocations += 1;
        let len = attempt.records.len();
        let (first_failed, function_error) = match outcome {
            Outcome::Success => {
                self.done_through(attempt.records.last());
                return Completion::Checkpointed { processed: len };
            }
            Outcome::PartialFailure { first_failed } => (first_failed.min(len), None),
            Outcome::InvalidResponse { .. } => (0, None),
            Outcome::FunctionError(e) => {
                if self.settings.bisect_on_error && len > 1 {
                    let second = attempt.records.split_off(len / 2);
                    let halves = [
                        Attempt {
                            records: second,
                            retries: attempt.retries,
                            invocations: attempt.invocations,
                            redelivery: true,
                        },
                        Attempt {
                            records: std::mem::take(&mut attempt.records),
                            retries: attempt.retries,
                            invocations: attempt.invocations,
                            redelivery: true,
                        },
                    ];
                    let (second_half, first_half) =
                        (halves[0].records.len(), halves[1].records.len());
                    for half in halves {
                        self.retries.push_front(half);
                    }
                    return Completion::Bisected {
                        first_half,
                        second_half,
                    };
                }
                (0, Some(e))
            }
        };
        // Records before the first failure are done: the checkpoint moves past them.
        let rest = attempt.records.split_off(first_failed);
        self.done_through(attempt.records.last());
        let processed = first_failed;
        let rest = Attempt {
            records: rest,
            retries: attempt.retries,
            invocations: attempt.invocations,
            redelivery: true,
        };
        if rest.records.is_empty() {
            return Completion::Checkpointed { processed };
        }
        if self.settings.may_retry(rest.retries) {
            let retried = rest.records.len();
            self.retries.push_front(Attempt {
                retries: rest.retries + 1,
                ..rest
            });
            return Completion::Retrying { processed, retried };
        }
        self.done_through(rest.records.last());
        Completion::Discarded {
            processed,
            attempt: rest,
            condition: DiscardCondition::RetryAttemptsExhausted,
            function_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Clone, PartialEq)]
    struct Rec(String, usize);

    impl BatchRecord for Rec {
        fn sequence_number(&self) -> &str {
            &self.0
        }
        fn payload_len(&self) -> usize {
            self.1
        }
    }

    fn recs(from: usize, to: usize) -> Vec<Rec> {
        (from..to).map(|i| Rec(format!("{:05}", i), 10)).collect()
    }

    fn seqs(a: &Attempt<Rec>) -> Vec<&str> {
        a.records.iter().map(|r| r.0.as_str()).collect()
    }

    fn settings() -> EsmSettings {
        EsmSettings {
            batch_size: 4,
            max_retry_attempts: Some(2),
            ..EsmSettings::default()
        }
    }

    fn invoke(state: &mut ShardState<Rec>, now: u64) -> Attempt<Rec> {
        match state.next_step(now) {
            Step::Invoke(a) => a,
            other => panic!("expected an invocation, got {other:?}"),
        }
    }

    #[test]
    fn batches_hold_at_most_batch_size_records_in_order() {
        let mut s = ShardState::new(settings(), None);
        s.push_records(recs(0, 10), 0);
        let a = invoke(&mut s, 0);
        assert_eq!(seqs(&a), ["00000", "00001", "00002", "00003"]);
        assert_eq!(
            s.complete(a, Outcome::Success),
            Completion::Checkpointed { processed: 4 }
        );
        assert_eq!(s.checkpoint(), Some("00003"));
        assert_eq!(invoke(&mut s, 0).records.len(), 4);
        assert_eq!(invoke(&mut s, 0).records.len(), 2);
        assert_eq!(s.next_step(0), Step::Gather { invoke_by_ms: None });
    }

    #[test]
    fn payload_limit_cuts_a_batch_before_the_record_that_would_overflow() {
        let mut s = ShardState::new(
            EsmSettings {
                batch_size: 100,
                max_payload_bytes: 25,
                ..settings()
            },
            None,
        );
        s.push_records(recs(0, 5), 0);
        assert_eq!(invoke(&mut s, 0).records.len(), 2, "3 × 10 bytes > 25");
        // An oversized record still goes, alone.
        let mut big = ShardState::new(
            EsmSettings {
                max_payload_bytes: 5,
                ..settings()
            },
            None,
        );
        big.push_records(recs(0, 2), 0);
        assert_eq!(invoke(&mut big, 0).records.len(), 1);
    }

    #[test]
    fn batching_window_waits_for_a_full_batch_or_the_deadline() {
        let mut s = ShardState::new(
            EsmSettings {
                batching_window: Duration::from_secs(2),
                ..settings()
            },
            None,
        );
        s.push_records(recs(0, 2), 1_000);
        assert_eq!(
            s.next_step(1_500),
            Step::Gather {
                invoke_by_ms: Some(3_000)
            }
        );
        assert_eq!(invoke(&mut s, 3_000).records.len(), 2, "window passed");
        s.push_records(recs(2, 6), 4_000);
        assert_eq!(
            invoke(&mut s, 4_001).records.len(),
            4,
            "full batch, no wait"
        );
    }

    #[test]
    fn partial_failure_checkpoints_before_the_lowest_reported_record_and_retries_the_rest() {
        let mut s = ShardState::new(settings(), None);
        s.push_records(recs(0, 6), 0);
        let a = invoke(&mut s, 0);
        let ids = ["00000", "00001", "00002", "00003"];
        let response = json!({"batchItemFailures": [{"itemIdentifier": "00003"}, {"itemIdentifier": "00002"}]});
        let outcome = judge(s.settings(), &ids, &Ok(response));
        assert_eq!(outcome, Outcome::PartialFailure { first_failed: 2 });
        assert_eq!(
            s.complete(a, outcome),
            Completion::Retrying {
                processed: 2,
                retried: 2
            }
        );
        assert_eq!(s.checkpoint(), Some("00001"));
        let retry = invoke(&mut s, 0);
        assert_eq!(
            seqs(&retry),
            ["00002", "00003"],
            "only the remainder, before new records"
        );
        assert!(retry.redelivery);
        assert_eq!(retry.retries, 1);
        s.complete(retry, Outcome::Success);
        assert_eq!(seqs(&invoke(&mut s, 0)), ["00004", "00005"]);
    }

    #[test]
    fn retries_are_bounded_and_then_the_rest_is_discarded_and_the_shard_moves_on() {
        let mut s = ShardState::new(settings(), None);
        s.push_records(recs(0, 5), 0);
        let fail_from_1 = || Outcome::PartialFailure { first_failed: 1 };
        let a = invoke(&mut s, 0);
        assert!(matches!(
            s.complete(a, fail_from_1()),
            Completion::Retrying { processed: 1, .. }
        ));
        let a = invoke(&mut s, 0);
        assert_eq!(seqs(&a)[0], "00001");
        assert!(matches!(
            s.complete(a, fail_from_1()),
            Completion::Retrying { processed: 1, .. }
        ));
        let a = invoke(&mut s, 0);
        assert_eq!(seqs(&a), ["00002", "00003"]);
        match s.complete(a, fail_from_1()) {
            Completion::Discarded {
                processed,
                attempt,
                condition,
                function_error,
            } => {
                assert_eq!(processed, 1);
                assert_eq!(seqs(&attempt), ["00003"]);
                assert_eq!(attempt.invocations, 3);
                assert_eq!(condition, DiscardCondition::RetryAttemptsExhausted);
                assert_eq!(function_error, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.checkpoint(), Some("00003"));
        assert_eq!(seqs(&invoke(&mut s, 0)), ["00004"]);
    }

    #[test]
    fn zero_retry_attempts_discards_on_the_first_failure() {
        let mut s = ShardState::new(
            EsmSettings {
                max_retry_attempts: Some(0),
                ..settings()
            },
            None,
        );
        s.push_records(recs(0, 2), 0);
        let a = invoke(&mut s, 0);
        let outcome = Outcome::FunctionError(FunctionError::Unhandled("boom".into()));
        assert!(matches!(
            s.complete(a, outcome),
            Completion::Discarded { processed: 0, .. }
        ));
        assert!(s.is_idle());
    }

    #[test]
    fn function_error_with_bisect_splits_in_order_without_consuming_retries() {
        let mut s = ShardState::new(
            EsmSettings {
                bisect_on_error: true,
                max_retry_attempts: Some(1),
                ..settings()
            },
            None,
        );
        s.push_records(recs(0, 4), 0);
        let err = || Outcome::FunctionError(FunctionError::Timeout(Duration::from_secs(3)));
        let a = invoke(&mut s, 0);
        assert_eq!(
            s.complete(a, err()),
            Completion::Bisected {
                first_half: 2,
                second_half: 2
            }
        );
        let first = invoke(&mut s, 0);
        assert_eq!(seqs(&first), ["00000", "00001"]);
        assert_eq!(
            first.retries, 0,
            "splitting does not consume the retry quota"
        );
        // The first half fails again: split again, down to single records.
        s.complete(first, err());
        let one = invoke(&mut s, 0);
        assert_eq!(seqs(&one), ["00000"]);
        s.complete(one, Outcome::Success);
        let poison = invoke(&mut s, 0);
        assert_eq!(seqs(&poison), ["00001"]);
        // A single record cannot be split: it is retried (1 allowed), then discarded.
        assert!(matches!(
            s.complete(poison, err()),
            Completion::Retrying { .. }
        ));
        let poison = invoke(&mut s, 0);
        assert_eq!(poison.retries, 1);
        match s.complete(poison, err()) {
            Completion::Discarded {
                attempt,
                function_error,
                ..
            } => {
                assert_eq!(seqs(&attempt), ["00001"]);
                assert!(matches!(function_error, Some(FunctionError::Timeout(_))));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            seqs(&invoke(&mut s, 0)),
            ["00002", "00003"],
            "the second half runs last"
        );
    }

    #[test]
    fn function_error_without_bisect_retries_the_whole_batch() {
        let mut s = ShardState::new(settings(), None);
        s.push_records(recs(0, 3), 0);
        let a = invoke(&mut s, 0);
        let outcome = Outcome::FunctionError(FunctionError::Crashed("panic".into()));
        assert_eq!(
            s.complete(a, outcome),
            Completion::Retrying {
                processed: 0,
                retried: 3
            }
        );
        assert_eq!(s.checkpoint(), None);
        assert_eq!(invoke(&mut s, 0).records.len(), 3);
    }

    #[test]
    fn responses_are_read_as_lambda_reads_them() {
        let s = settings();
        let ids = ["1", "2"];
        let ok = |v: Value| judge(&s, &ids, &Ok(v));
        assert_eq!(ok(json!({"batchItemFailures": []})), Outcome::Success);
        assert_eq!(ok(json!({"batchItemFailures": null})), Outcome::Success);
        assert_eq!(ok(json!({})), Outcome::Success);
        assert_eq!(ok(Value::Null), Outcome::Success);
        for bad in [
            json!({"batchItemFailures": [{"itemIdentifier": ""}]}),
            json!({"batchItemFailures": [{"itemIdentifier": null}]}),
            json!({"batchItemFailures": [{"sequenceNumber": "2"}]}),
            json!({"batchItemFailures": [{"itemIdentifier": "9"}]}),
        ] {
            assert!(
                matches!(ok(bad.clone()), Outcome::InvalidResponse { .. }),
                "{bad}"
            );
        }
        // Without ReportBatchItemFailures the response is not read at all.
        let plain = EsmSettings {
            report_batch_item_failures: false,
            ..settings()
        };
        let failing = json!({"batchItemFailures": [{"itemIdentifier": "1"}]});
        assert_eq!(judge(&plain, &ids, &Ok(failing)), Outcome::Success);
    }

    #[test]
    fn an_invalid_response_fails_the_whole_batch_without_bisecting() {
        let mut s = ShardState::new(
            EsmSettings {
                bisect_on_error: true,
                ..settings()
            },
            None,
        );
        s.push_records(recs(0, 4), 0);
        let a = invoke(&mut s, 0);
        let outcome = Outcome::InvalidResponse { reason: "x".into() };
        assert_eq!(
            s.complete(a, outcome),
            Completion::Retrying {
                processed: 0,
                retried: 4
            }
        );
    }

    #[test]
    fn settings_outside_lambdas_ranges_are_refused() {
        assert!(EsmSettings::default().validate().is_ok());
        for bad in [
            EsmSettings {
                batch_size: 0,
                ..EsmSettings::default()
            },
            EsmSettings {
                batch_size: 10_001,
                ..EsmSettings::default()
            },
            EsmSettings {
                batching_window: Duration::from_secs(301),
                ..EsmSettings::default()
            },
            EsmSettings {
                max_retry_attempts: Some(10_001),
                ..EsmSettings::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
