//! The event source mapping runner: reads every shard of the local Kinesis streams, builds
//! `KinesisEvent`s exactly as Lambda builds them from `GetRecords` output, invokes the
//! functions, and applies the outcome with the pure rules of [`crate::esm`] (checkpoint at the
//! first failed record, bounded retries, bisect on function error, on-failure destination).
//!
//! Each shard of each mapping is polled by its own task, one invocation at a time, as Lambda
//! does with `ParallelizationFactor` 1. Mappings run in stages: a stage stops when its streams
//! are drained *and* the stage before it has stopped (the enricher keeps polling the joined
//! stream while the joiner can still write to it).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_sdk_kinesis::types::{EncryptionType, Record};
use aws_sdk_kinesis::Client;
use base64::Engine;
use serde_json::{json, Value};

use crate::esm::{
    judge, Attempt, BatchRecord, Completion, EsmSettings, FunctionError, Outcome, ShardState,
    StartingPosition, Step,
};
use crate::stream_read::{shard_ids, ShardReader, Start};
use crate::LocalError;

/// An invocation in flight. It need not be `Send`: the handlers' futures are not provably
/// `Send` to today's compiler (closures over borrowed batch data), so the runner drives each
/// invocation on a thread of its own, which also lets a timeout or a panic end that invocation
/// alone, as it ends an execution environment on Lambda.
pub type Invocation = Pin<Box<dyn Future<Output = Result<Value, FunctionError>>>>;

/// A function the runner can invoke: a real-shaped `KinesisEvent` in, the response as the
/// JSON Lambda would receive out.
pub trait KinesisFunction: Send + Sync + 'static {
    /// The function's ARN (for on-failure records).
    fn arn(&self) -> String;
    fn invoke(self: Arc<Self>, event: KinesisEvent) -> Invocation;
}

/// Where a mapping sends the description of records it gave up on.
pub trait FailureDestination: Send + Sync {
    fn send<'a>(
        &'a self,
        record: &'a Value,
    ) -> Pin<Box<dyn Future<Output = Result<(), LocalError>> + Send + 'a>>;
}

/// An on-failure destination in memory (tests).
#[derive(Debug, Default)]
pub struct MemoryDestination {
    pub records: Mutex<Vec<Value>>,
}

impl FailureDestination for MemoryDestination {
    fn send<'a>(
        &'a self,
        record: &'a Value,
    ) -> Pin<Box<dyn Future<Output = Result<(), LocalError>> + Send + 'a>> {
        Box::pin(async move {
            self.records
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(record.clone());
            Ok(())
        })
    }
}

/// An on-failure destination in SQS, as the template configures it: one message per discarded
/// batch, its body the invocation record (Lambda sends the same to an SQS destination).
#[derive(Debug, Clone)]
pub struct SqsDestination {
    pub client: aws_sdk_sqs::Client,
    pub queue_url: String,
}

impl FailureDestination for SqsDestination {
    fn send<'a>(
        &'a self,
        record: &'a Value,
    ) -> Pin<Box<dyn Future<Output = Result<(), LocalError>> + Send + 'a>> {
        Box::pin(async move {
            self.client
                .send_message()
                .queue_url(&self.queue_url)
                .message_body(record.to_string())
                .send()
                .await
                .map_err(|e| LocalError::aws("SQS SendMessage (on-failure destination)", e))?;
            Ok(())
        })
    }
}

/// Live counts of one mapping.
#[derive(Debug, Default)]
pub struct MappingStats {
    pub records_read: AtomicU64,
    pub invocations: AtomicU64,
    /// Records handed to the function, redeliveries included.
    pub records_delivered: AtomicU64,
    /// Records the checkpoint has passed (processed or discarded).
    pub records_done: AtomicU64,
    pub retries: AtomicU64,
    pub bisections: AtomicU64,
    pub partial_failures: AtomicU64,
    pub function_errors: AtomicU64,
    pub invalid_responses: AtomicU64,
    pub discarded: AtomicU64,
}

/// A snapshot of [`MappingStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MappingCounts {
    pub records_read: u64,
    pub invocations: u64,
    pub records_delivered: u64,
    pub records_done: u64,
    pub retries: u64,
    pub bisections: u64,
    pub partial_failures: u64,
    pub function_errors: u64,
    pub invalid_responses: u64,
    pub discarded: u64,
}

impl MappingStats {
    pub fn snapshot(&self) -> MappingCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MappingCounts {
            records_read: get(&self.records_read),
            invocations: get(&self.invocations),
            records_delivered: get(&self.records_delivered),
            records_done: get(&self.records_done),
            retries: get(&self.retries),
            bisections: get(&self.bisections),
            partial_failures: get(&self.partial_failures),
            function_errors: get(&self.function_errors),
            invalid_responses: get(&self.invalid_responses),
            discarded: get(&self.discarded),
        }
    }
}

/// One event source mapping: a stream, a function, its settings and destination.
pub struct Mapping {
    pub name: String,
    pub stream: String,
    pub settings: EsmSettings,
    pub function: Arc<dyn KinesisFunction>,
    pub destination: Option<Arc<dyn FailureDestination>>,
    /// The execution role, for the events' `invokeIdentityArn`.
    pub role_arn: String,
    pub stats: Arc<MappingStats>,
}

impl Mapping {
    pub fn new(
        name: impl Into<String>,
        stream: impl Into<String>,
        settings: EsmSettings,
        function: Arc<dyn KinesisFunction>,
        role_arn: impl Into<String>,
    ) -> Self {
        Mapping {
            name: name.into(),
            stream: stream.into(),
            settings,
            function,
            destination: None,
            role_arn: role_arn.into(),
            stats: Arc::new(MappingStats::default()),
        }
    }

    pub fn with_destination(mut self, destination: Arc<dyn FailureDestination>) -> Self {
        self.destination = Some(destination);
        self
    }
}

/// A record read from a shard, already in its event form.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardRecord {
    pub sequence_number: String,
    /// The record's JSON inside the event's `Records` array.
    pub event_json: String,
    pub arrival_ms: i64,
}

impl BatchRecord for ShardRecord {
    fn sequence_number(&self) -> &str {
        &self.sequence_number
    }
    fn payload_len(&self) -> usize {
        // The JSON plus the comma that separates it from the next record.
        self.event_json.len() + 1
    }
}

/// Where an event record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSource {
    pub stream_arn: String,
    pub shard_id: String,
    pub region: String,
    pub role_arn: String,
}

/// A record of a Lambda Kinesis event, as Lambda builds it from a `GetRecords` record.
pub fn event_record(
    source: &EventSource,
    sequence_number: &str,
    partition_key: &str,
    data: &[u8],
    arrival_ms: i64,
    kms: bool,
) -> Value {
    let mut kinesis = json!({
        "kinesisSchemaVersion": "1.0",
        "partitionKey": partition_key,
        "sequenceNumber": sequence_number,
        "data": base64::engine::general_purpose::STANDARD.encode(data),
        "approximateArrivalTimestamp": arrival_ms as f64 / 1000.0,
    });
    if kms {
        kinesis["encryptionType"] = json!("KMS");
    }
    json!({
        "kinesis": kinesis,
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": format!("{}:{sequence_number}", source.shard_id),
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": source.role_arn,
        "awsRegion": source.region,
        "eventSourceARN": source.stream_arn,
    })
}

fn shard_record(source: &EventSource, r: &Record) -> ShardRecord {
    let arrival_ms = r
        .approximate_arrival_timestamp()
        .and_then(|t| t.to_millis().ok())
        .unwrap_or_default();
    let kms = matches!(r.encryption_type(), Some(EncryptionType::Kms));
    let json = event_record(
        source,
        r.sequence_number(),
        r.partition_key().unwrap_or_default(),
        r.data().as_ref(),
        arrival_ms,
        kms,
    );
    ShardRecord {
        sequence_number: r.sequence_number().to_owned(),
        event_json: json.to_string(),
        arrival_ms,
    }
}

/// The event for a batch. It goes through JSON, as Lambda's does, so the handler sees only
/// what the wire format carries.
pub fn kinesis_event(records: &[ShardRecord]) -> Result<KinesisEvent, serde_json::Error> {
    let mut text = String::with_capacity(
        records
            .iter()
            .map(|r| r.event_json.len() + 1)
            .sum::<usize>()
            + 16,
    );
    text.push_str("{\"Records\":[");
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&r.event_json);
    }
    text.push_str("]}");
    serde_json::from_str(&text)
}

fn iso_millis(ms: i64) -> String {
    adpipe_core::time::format_millis(ms)
}

/// A stable request id for an invocation, UUID-shaped.
fn request_id(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    let d: String = h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &d[..8],
        &d[8..12],
        &d[12..16],
        &d[16..20],
        &d[20..32]
    )
}

/// The on-failure destination's record for discarded records, in the shape Lambda sends for
/// Kinesis (`requestContext`, `responseContext`, `KinesisBatchInfo`).
pub fn on_failure_record(
    function_arn: &str,
    source: &EventSource,
    attempt: &Attempt<ShardRecord>,
    condition: &str,
    function_error: Option<&FunctionError>,
    now_ms: i64,
) -> Value {
    let first = attempt.records.first();
    let last = attempt.records.last();
    let seq = |r: Option<&ShardRecord>| r.map(|r| r.sequence_number.clone()).unwrap_or_default();
    let arrival = |r: Option<&ShardRecord>| iso_millis(r.map_or(0, |r| r.arrival_ms));
    let mut response = json!({ "statusCode": 200, "executedVersion": "$LATEST" });
    if let Some(e) = function_error {
        response["functionError"] = json!("Unhandled");
        response["errorMessage"] = json!(e.to_string());
    }
    json!({
        "requestContext": {
            "requestId": request_id(&[function_arn, &source.shard_id, &seq(first), &attempt.invocations.to_string()]),
            "functionArn": function_arn,
            "condition": condition,
            "approximateInvokeCount": attempt.invocations,
        },
        "responseContext": response,
        "version": "1.0",
        "timestamp": iso_millis(now_ms),
        "KinesisBatchInfo": {
            "shardId": source.shard_id,
            "startSequenceNumber": seq(first),
            "endSequenceNumber": seq(last),
            "approximateArrivalOfFirstRecord": arrival(first),
            "approximateArrivalOfLastRecord": arrival(last),
            "batchSize": attempt.records.len(),
            "streamArn": source.stream_arn,
        },
    })
}

/// Invokes `function` on a thread of its own, within `timeout`. A timeout drops the
/// invocation's future at its next await; a panic ends only that thread.
pub async fn invoke(
    function: Arc<dyn KinesisFunction>,
    event: KinesisEvent,
    timeout: Duration,
) -> Result<Value, FunctionError> {
    let runtime = tokio::runtime::Handle::current();
    let task = tokio::task::spawn_blocking(move || {
        runtime.block_on(async move { tokio::time::timeout(timeout, function.invoke(event)).await })
    });
    match task.await {
        Ok(Ok(result)) => result,
        Ok(Err(_elapsed)) => Err(FunctionError::Timeout(timeout)),
        Err(join) if join.is_panic() => {
            let payload = join.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            Err(FunctionError::Crashed(message))
        }
        Err(join) => Err(FunctionError::Crashed(join.to_string())),
    }
}

/// The key of a checkpoint: stream name and shard id.
pub type ShardKey = (String, String);

/// How a run behaves.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Pause after an empty `GetRecords` (Lambda polls a shard about once a second).
    pub poll_interval: Duration,
    /// `GetRecords` `Limit`.
    pub read_limit: i32,
    /// Checkpoints to resume from (a shard without one starts at the mapping's
    /// `StartingPosition`).
    pub checkpoints: BTreeMap<ShardKey, String>,
    /// Set when whatever feeds the first stage has finished; the first stage stops only after
    /// it is set and its streams are drained. Never set: the run follows the streams forever.
    pub producers_done: Arc<AtomicBool>,
    pub region: String,
}

impl RunOptions {
    /// Drain what is in the streams now, then stop.
    pub fn drain(region: &str) -> Self {
        RunOptions {
            poll_interval: Duration::from_millis(250),
            read_limit: 10_000,
            checkpoints: BTreeMap::new(),
            producers_done: Arc::new(AtomicBool::new(true)),
            region: region.to_owned(),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub mappings: Vec<(String, MappingCounts)>,
    /// Where every shard stands now.
    pub checkpoints: BTreeMap<ShardKey, String>,
    pub elapsed: Duration,
}

impl RunReport {
    pub fn counts(&self, mapping: &str) -> MappingCounts {
        self.mappings
            .iter()
            .find(|(n, _)| n == mapping)
            .map(|(_, c)| *c)
            .unwrap_or_default()
    }
}

/// Runs mappings, stage after stage, until every stage is drained (see the module docs).
pub async fn run(
    kinesis: &Client,
    stages: Vec<Vec<Mapping>>,
    options: RunOptions,
) -> Result<RunReport, LocalError> {
    let started = Instant::now();
    let mut upstream = options.producers_done.clone();
    let mut stage_tasks = Vec::new();
    let mut names = Vec::new();
    for stage in stages {
        let done = Arc::new(AtomicBool::new(false));
        let mut shard_tasks = Vec::new();
        for mapping in stage {
            mapping.settings.validate()?;
            let mapping = Arc::new(mapping);
            names.push((mapping.name.clone(), mapping.stats.clone()));
            let (arn, shards) = describe(kinesis, &mapping.stream).await?;
            for shard in shards {
                let key = (mapping.stream.clone(), shard.clone());
                let checkpoint = options.checkpoints.get(&key).cloned();
                let task = ShardTask {
                    kinesis: kinesis.clone(),
                    mapping: mapping.clone(),
                    source: EventSource {
                        stream_arn: arn.clone(),
                        shard_id: shard,
                        region: options.region.clone(),
                        role_arn: mapping.role_arn.clone(),
                    },
                    checkpoint,
                    upstream_done: upstream.clone(),
                    poll_interval: options.poll_interval,
                    read_limit: options.read_limit,
                };
                shard_tasks.push(tokio::spawn(task.run()));
            }
        }
        let finished = done.clone();
        stage_tasks.push(tokio::spawn(async move {
            let mut checkpoints = BTreeMap::new();
            let mut first_error = None;
            for t in shard_tasks {
                match t.await {
                    Ok(Ok((key, Some(cp)))) => {
                        checkpoints.insert(key, cp);
                    }
                    Ok(Ok((_, None))) => {}
                    Ok(Err(e)) => {
                        first_error.get_or_insert(e);
                    }
                    Err(e) => {
                        first_error.get_or_insert(LocalError::Runner(format!("shard task: {e}")));
                    }
                }
            }
            finished.store(true, Ordering::SeqCst);
            match first_error {
                Some(e) => Err(e),
                None => Ok(checkpoints),
            }
        }));
        upstream = done;
    }
    let mut report = RunReport {
        checkpoints: options.checkpoints.clone(),
        ..RunReport::default()
    };
    let mut first_error = None;
    for t in stage_tasks {
        match t.await {
            Ok(Ok(cps)) => report.checkpoints.extend(cps),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(LocalError::Runner(format!("stage task: {e}")));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    report.mappings = names.into_iter().map(|(n, s)| (n, s.snapshot())).collect();
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The stream's ARN and its shards.
async fn describe(kinesis: &Client, stream: &str) -> Result<(String, Vec<String>), LocalError> {
    let summary = kinesis
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(|e| LocalError::aws("Kinesis DescribeStreamSummary", e))?;
    let arn = summary
        .stream_description_summary()
        .map(|s| s.stream_arn().to_owned())
        .unwrap_or_default();
    Ok((arn, shard_ids(kinesis, stream).await?))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

struct ShardTask {
    kinesis: Client,
    mapping: Arc<Mapping>,
    source: EventSource,
    checkpoint: Option<String>,
    upstream_done: Arc<AtomicBool>,
    poll_interval: Duration,
    read_limit: i32,
}

/// Consecutive `GetRecords` failures before the run gives up on a shard.
const MAX_READ_ERRORS: u32 = 20;

impl ShardTask {
    /// The shard, read from just after `after`, or from the mapping's starting position.
    async fn open(&self, after: Option<&str>) -> Result<ShardReader, LocalError> {
        let start = match (after, self.mapping.settings.starting_position) {
            (Some(seq), _) => Start::After(seq),
            (None, StartingPosition::TrimHorizon) => Start::TrimHorizon,
            (None, StartingPosition::Latest) => Start::Latest,
        };
        let (stream, shard) = (&self.mapping.stream, &self.source.shard_id);
        ShardReader::open(&self.kinesis, stream, shard, start, Some(self.read_limit)).await
    }

    async fn run(self) -> Result<(ShardKey, Option<String>), LocalError> {
        let key = (self.mapping.stream.clone(), self.source.shard_id.clone());
        let stats = self.mapping.stats.clone();
        let mut state: ShardState<ShardRecord> =
            ShardState::new(self.mapping.settings.clone(), self.checkpoint.clone());
        let mut last_read = self.checkpoint.clone();
        let mut reader = self.open(last_read.as_deref()).await?;
        let mut read_errors = 0u32;
        let clock = Instant::now();
        let elapsed_ms = || clock.elapsed().as_millis() as u64;
        loop {
            match state.next_step(elapsed_ms()) {
                Step::Invoke(attempt) => {
                    if attempt.redelivery && !state.settings().retry_delay.is_zero() {
                        tokio::time::sleep(state.settings().retry_delay).await;
                    }
                    self.invoke_and_complete(&mut state, attempt).await?;
                }
                Step::Gather { invoke_by_ms } => {
                    // Read the flag *before* polling: an empty poll after the upstream was
                    // done proves nothing more can come.
                    let upstream_done = self.upstream_done.load(Ordering::SeqCst);
                    if reader.is_closed() {
                        // The shard is closed and everything in it was read.
                        if invoke_by_ms.is_none() && state.is_idle() {
                            break;
                        }
                        tokio::time::sleep(self.poll_interval).await;
                        continue;
                    }
                    let records = match reader.page().await {
                        Ok(p) => {
                            read_errors = 0;
                            p
                        }
                        Err(e) => {
                            read_errors += 1;
                            if read_errors >= MAX_READ_ERRORS {
                                return Err(e);
                            }
                            tracing::warn!(stream = %self.mapping.stream, shard = %self.source.shard_id, error = %e, "GetRecords failed; reopening the shard");
                            tokio::time::sleep(self.poll_interval).await;
                            reader = self.open(last_read.as_deref()).await?;
                            continue;
                        }
                    };
                    if let Some(last) = records.last() {
                        last_read = Some(last.sequence_number().to_owned());
                        stats
                            .records_read
                            .fetch_add(records.len() as u64, Ordering::Relaxed);
                        let converted: Vec<ShardRecord> = records
                            .iter()
                            .map(|r| shard_record(&self.source, r))
                            .collect();
                        state.push_records(converted, elapsed_ms());
                        continue;
                    }
                    if invoke_by_ms.is_none() && state.is_idle() && upstream_done {
                        break;
                    }
                    let wait = match invoke_by_ms {
                        Some(t) => Duration::from_millis(t.saturating_sub(elapsed_ms()))
                            .min(self.poll_interval),
                        None => self.poll_interval,
                    };
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Ok((key, state.checkpoint().map(str::to_owned)))
    }

    async fn invoke_and_complete(
        &self,
        state: &mut ShardState<ShardRecord>,
        attempt: Attempt<ShardRecord>,
    ) -> Result<(), LocalError> {
        let stats = &self.mapping.stats;
        let event = kinesis_event(&attempt.records)
            .map_err(LocalError::json("building a Kinesis event"))?;
        stats.invocations.fetch_add(1, Ordering::Relaxed);
        stats
            .records_delivered
            .fetch_add(attempt.records.len() as u64, Ordering::Relaxed);
        let result = invoke(
            self.mapping.function.clone(),
            event,
            state.settings().function_timeout,
        )
        .await;
        let seqs: Vec<&str> = attempt
            .records
            .iter()
            .map(|r| r.sequence_number.as_str())
            .collect();
        let outcome = judge(state.settings(), &seqs, &result);
        match &outcome {
            Outcome::Success => {}
            Outcome::PartialFailure { .. } => {
                stats.partial_failures.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::InvalidResponse { reason } => {
                stats.invalid_responses.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(mapping = %self.mapping.name, %reason, "unusable batch response; the whole batch failed");
            }
            Outcome::FunctionError(e) => {
                stats.function_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(mapping = %self.mapping.name, shard = %self.source.shard_id, error = %e, "invocation failed");
            }
        }
        match state.complete(attempt, outcome) {
            Completion::Checkpointed { processed } => {
                stats
                    .records_done
                    .fetch_add(processed as u64, Ordering::Relaxed);
            }
            Completion::Retrying { processed, .. } => {
                stats
                    .records_done
                    .fetch_add(processed as u64, Ordering::Relaxed);
                stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            Completion::Bisected { .. } => {
                stats.bisections.fetch_add(1, Ordering::Relaxed);
            }
            Completion::Discarded {
                processed,
                attempt,
                condition,
                function_error,
            } => {
                let n = attempt.records.len() as u64;
                stats
                    .records_done
                    .fetch_add(processed as u64 + n, Ordering::Relaxed);
                stats.discarded.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(mapping = %self.mapping.name, shard = %self.source.shard_id, records = n, condition = condition.as_str(), "retries exhausted; records discarded to the on-failure destination");
                if let Some(dest) = &self.mapping.destination {
                    let record = on_failure_record(
                        &self.mapping.function.arn(),
                        &self.source,
                        &attempt,
                        condition.as_str(),
                        function_error.as_ref(),
                        now_ms(),
                    );
                    send_with_retries(dest.as_ref(), &record).await?;
                }
            }
        }
        Ok(())
    }
}

async fn send_with_retries(
    dest: &dyn FailureDestination,
    record: &Value,
) -> Result<(), LocalError> {
    let mut delay = Duration::from_millis(100);
    let mut last = None;
    for _ in 0..5 {
        match dest.send(record).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "on-failure destination refused a record; retrying");
                last = Some(e);
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    Err(last.unwrap_or_else(|| LocalError::Runner("on-failure destination".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> EventSource {
        EventSource {
            stream_arn: "arn:aws:kinesis:us-east-1:123456789012:stream/adpipe-local-impressions"
                .into(),
            shard_id: "shardId-000000000001".into(),
            region: "us-east-1".into(),
            role_arn: "arn:aws:iam::123456789012:role/adpipe-joiner".into(),
        }
    }

    fn record(seq: &str, data: &[u8]) -> ShardRecord {
        let v = event_record(&source(), seq, "imp-1", data, 1_795_169_730_500, false);
        ShardRecord {
            sequence_number: seq.into(),
            event_json: v.to_string(),
            arrival_ms: 1_795_169_730_500,
        }
    }

    #[test]
    fn events_have_lambdas_shape_and_the_handlers_read_their_positions() {
        let records = vec![record("4960001", b"{\"a\":1}"), record("4960002", b"\xff")];
        let event = kinesis_event(&records).unwrap();
        let v: Value = serde_json::from_str(&records[0].event_json).unwrap();
        let r0 = &v;
        assert_eq!(r0["eventSource"], "aws:kinesis");
        assert_eq!(r0["eventName"], "aws:kinesis:record");
        assert_eq!(r0["eventVersion"], "1.0");
        assert_eq!(r0["eventID"], "shardId-000000000001:4960001");
        assert_eq!(r0["awsRegion"], "us-east-1");
        assert_eq!(r0["kinesis"]["kinesisSchemaVersion"], "1.0");
        assert_eq!(r0["kinesis"]["data"], "eyJhIjoxfQ==");
        assert_eq!(
            r0["kinesis"]["approximateArrivalTimestamp"],
            1_795_169_730.5
        );
        // Not checked through `event`: aws_lambda_events 1.2.1 reads the fraction's digits as
        // milliseconds (`.5` becomes 5 ms, `.123` is right). No adpipe code reads the field.
        // The joiner's edge recovers stream, shard, sequence number and the raw bytes.
        let inputs = adpipe_lambda::input_records(&event);
        assert_eq!(inputs[1].position.stream, "adpipe-local-impressions");
        assert_eq!(inputs[1].position.shard, "shardId-000000000001");
        assert_eq!(inputs[1].position.sequence_number, "4960002");
        assert_eq!(inputs[1].data, b"\xff");
        // The fixtures in events/ have the same fields.
        let fixture: Value = serde_json::from_str(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../events/impressions.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let keys = |v: &Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&fixture["Records"][0]), keys(r0));
        assert_eq!(
            keys(&fixture["Records"][0]["kinesis"]),
            keys(&r0["kinesis"])
        );
    }

    #[test]
    fn on_failure_records_describe_the_discarded_batch() {
        let attempt = Attempt {
            records: vec![record("10", b"x"), record("11", b"y")],
            retries: 3,
            invocations: 4,
            redelivery: true,
        };
        let v = on_failure_record(
            "arn:aws:lambda:us-east-1:123456789012:function:joiner",
            &source(),
            &attempt,
            "RetryAttemptsExhausted",
            Some(&FunctionError::Timeout(Duration::from_secs(3))),
            1_795_169_800_000,
        );
        let info = &v["KinesisBatchInfo"];
        assert_eq!(info["startSequenceNumber"], "10");
        assert_eq!(info["endSequenceNumber"], "11");
        assert_eq!(info["batchSize"], 2);
        assert_eq!(info["shardId"], "shardId-000000000001");
        assert_eq!(
            info["approximateArrivalOfFirstRecord"],
            "2026-11-20T10:15:30.500Z"
        );
        assert_eq!(v["requestContext"]["condition"], "RetryAttemptsExhausted");
        assert_eq!(v["requestContext"]["approximateInvokeCount"], 4);
        assert_eq!(v["responseContext"]["functionError"], "Unhandled");
        assert_eq!(v["requestContext"]["requestId"].as_str().unwrap().len(), 36);
    }

    struct Panics;
    impl KinesisFunction for Panics {
        fn arn(&self) -> String {
            "arn".into()
        }
        fn invoke(self: Arc<Self>, _event: KinesisEvent) -> Invocation {
            Box::pin(async move { panic!("handler bug") })
        }
    }

    struct Sleeps;
    impl KinesisFunction for Sleeps {
        fn arn(&self) -> String {
            "arn".into()
        }
        fn invoke(self: Arc<Self>, _event: KinesisEvent) -> Invocation {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(Value::Null)
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn panics_and_timeouts_are_function_errors() {
        let e = invoke(
            Arc::new(Panics),
            KinesisEvent::default(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(e, Err(FunctionError::Crashed("handler bug".into())));
        let e = invoke(
            Arc::new(Sleeps),
            KinesisEvent::default(),
            Duration::from_millis(20),
        )
        .await;
        assert_eq!(e, Err(FunctionError::Timeout(Duration::from_millis(20))));
    }
}
