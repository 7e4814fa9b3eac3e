//! Test kit (feature `testkit`): random join scenarios, a poller that replays Lambda's Kinesis
//! event source mapping (batches, checkpoint at the first reported failure, redelivery),
//! fault-injecting wrappers for any port, and the plain nested-loop reference join.
//!
//! Used by the core's property tests (in-memory state, many cases) and by the integration
//! tests (DynamoDB on the local endpoint, fewer cases): the same property for both.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::in_memory::FixedShardRanges;
use crate::join::buckets::BucketRange;
use crate::join::joiner::KeyedJoiner;
use crate::join::router::BatchRouter;
use crate::join::rule::{attributes, JoinRules};
use crate::join::state::{Blob, PutSlot, Slot};
use crate::model::{
    Click, Impression, InputRecord, JoinedRecord, JoinedStreamRecord, SourcePosition,
};
use crate::ports::{
    DeadLetter, DeadLetterSink, EntryResult, OutRecord, PortError, RecordSink, ShardRanges,
    StateLog,
};
pub use crate::validate::{encode_click as click_json, encode_impression as impression_json};

/// The seeded PRNG a scenario is a pure function of.
pub use crate::rng::Rng;

/// Offsets (click − impression event time, ms) that probe the window edges.
const EDGE_OFFSETS: [i64; 9] = [-30_001, -30_000, -29_999, -1, 0, 1, 29_999, 30_000, 30_001];

/// A generated workload: events, and the order and duplication of their delivery.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub impressions: Vec<Impression>,
    pub clicks: Vec<Click>,
    /// Raw records of the impressions stream in delivery order (duplicates included).
    pub impression_stream: Vec<Vec<u8>>,
    /// Raw records of the clicks stream in delivery order (duplicates included).
    pub click_stream: Vec<Vec<u8>>,
}

/// Knobs for [`Scenario::generate`].
#[derive(Debug, Clone, Copy)]
pub struct ScenarioSize {
    pub impressions: usize,
    pub clicks: usize,
    /// Share of deliveries repeated later in the stream.
    pub duplicate_rate: f64,
}

impl Scenario {
    /// Builds a scenario from a seed. `id_prefix` keeps scenarios apart in a shared table.
    pub fn generate(seed: u64, size: ScenarioSize, id_prefix: &str) -> Scenario {
        Self::generate_at(seed, size, id_prefix, 1_795_169_730_000, false)
    }

    /// [`Scenario::generate`] with event times from `base_ms` on (ten minutes of them), and
    /// with `opaque_ids` random UUID-shaped impression and click ids, which compress as real
    /// ones do (the default ids are short and sequential).
    pub fn generate_at(
        seed: u64,
        size: ScenarioSize,
        id_prefix: &str,
        base_ms: i64,
        opaque_ids: bool,
    ) -> Scenario {
        let mut ids = Rng::new(seed ^ 0x1D5);
        let mut id = |kind: &str, n: usize| {
            if opaque_ids {
                let (a, b) = (ids.next_u64(), ids.next_u64());
                format!(
                    "{id_prefix}{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
                    a >> 32,
                    (a >> 16) & 0xffff,
                    a & 0xfff,
                    b >> 52,
                    b & 0xffff_ffff_ffff
                )
            } else {
                format!("{id_prefix}{kind}-{n}")
            }
        };
        let mut rng = Rng::new(seed);
        let base = base_ms;
        let impressions: Vec<Impression> = (0..size.impressions)
            .map(|n| Impression {
                ad_id: format!("ad-{}", rng.below(3)),
                impression_id: id("imp", n),
                campaign_id: format!("camp-{}", rng.below(4)),
                publisher_id: format!("pub-{}", rng.below(5)),
                event_time_ms: base + rng.below(600_000) as i64,
                device_type: ["mobile", "Tablet", " desktop ", "tv"][rng.below(4) as usize].into(),
                geo_location: "US".into(),
                platform: "ios".into(),
                ad_type: "banner".into(),
                bid_price: (rng.below(10_000) as f64) / 100.0,
            })
            .collect();
        let clicks: Vec<Click> = (0..size.clicks)
            .map(|n| {
                // Mostly clicks on a real impression; some for an impression that never comes.
                let (imp_id, ad_id, imp_time) = if impressions.is_empty() || rng.chance(0.1) {
                    (
                        format!("{id_prefix}imp-missing-{}", rng.below(3)),
                        "ad-0".to_owned(),
                        base,
                    )
                } else {
                    let i = &impressions[rng.below(impressions.len() as u64) as usize];
                    let ad = if rng.chance(0.9) {
                        i.ad_id.clone()
                    } else {
                        "ad-other".into()
                    };
                    (i.impression_id.clone(), ad, i.event_time_ms)
                };
                let offset = if rng.chance(0.5) {
                    EDGE_OFFSETS[rng.below(EDGE_OFFSETS.len() as u64) as usize]
                } else {
                    rng.below(80_001) as i64 - 40_000
                };
                let explicit_id = rng.chance(0.5);
                let mut click = Click {
                    ad_id,
                    impression_id: imp_id,
                    campaign_id: "camp-0".into(),
                    publisher_id: "pub-0".into(),
                    event_time_ms: imp_time + offset,
                    device_type: "mobile".into(),
                    geo_location: "US".into(),
                    platform: "ios".into(),
                    // Distinct prices keep derived ids distinct.
                    click_price: n as f64 / 100.0,
                    click_id: id("clk", n),
                    click_id_derived: false,
                };
                if !explicit_id {
                    click.click_id = crate::validate::derive_click_id(&click);
                    click.click_id_derived = true;
                }
                click
            })
            .collect();
        let impression_stream = deliveries(
            &mut rng,
            impressions.iter().map(impression_json).collect(),
            size.duplicate_rate,
        );
        let click_stream = deliveries(
            &mut rng,
            clicks.iter().map(click_json).collect(),
            size.duplicate_rate,
        );
        Scenario {
            impressions,
            clicks,
            impression_stream,
            click_stream,
        }
    }

    /// The plain nested-loop reference join over the distinct events.
    pub fn reference_join(&self, rules: &JoinRules) -> Vec<JoinedRecord> {
        let mut out = Vec::new();
        for imp in &self.impressions {
            for click in &self.clicks {
                if attributes(rules, imp, click) {
                    out.push(JoinedRecord::new(imp, click));
                }
            }
        }
        sorted(out)
    }
}

fn deliveries(rng: &mut Rng, records: Vec<Vec<u8>>, duplicate_rate: f64) -> Vec<Vec<u8>> {
    let mut out = records.clone();
    for r in &records {
        if rng.chance(duplicate_rate) {
            out.push(r.clone());
        }
    }
    rng.shuffle(&mut out);
    out
}

/// Joined records sorted by pair key (duplicates kept, so a comparison sees them).
pub fn sorted(mut v: Vec<JoinedRecord>) -> Vec<JoinedRecord> {
    v.sort_by(|a, b| a.pair_key().cmp(&b.pair_key()));
    v
}

/// Decodes what the joined stream received.
pub fn decode_stream(records: &[OutRecord]) -> Vec<JoinedStreamRecord> {
    records
        .iter()
        .flat_map(|r| {
            serde_json::from_slice::<crate::model::JoinedWire>(&r.data)
                .expect("joined-stream record is valid JSON")
                .into_records()
        })
        .collect()
}

/// The attributed clicks the joined stream received, sorted by pair key, with the
/// `recovered` flag cleared (it says how a record was emitted, not what it is).
pub fn decode_joined(records: &[OutRecord]) -> Vec<JoinedRecord> {
    sorted(
        decode_stream(records)
            .into_iter()
            .filter_map(|r| match r {
                JoinedStreamRecord::Click(mut c) => {
                    c.recovered = false;
                    Some(c)
                }
                JoinedStreamRecord::Impression(_) => None,
            })
            .collect(),
    )
}

/// Checks the forwarded impressions: every distinct impression present, none unknown, and at
/// most one copy per impression *not* flagged `recovered` (the lake drops flagged repeats).
pub fn check_forwarded_impressions(
    records: &[OutRecord],
    scenario: &Scenario,
) -> Result<(), String> {
    let mut first_copies: std::collections::BTreeMap<String, u32> = Default::default();
    let mut seen = BTreeSet::new();
    for r in decode_stream(records) {
        if let JoinedStreamRecord::Impression(i) = r {
            seen.insert(i.impression_id.clone());
            if !i.recovered {
                *first_copies.entry(i.impression_id).or_default() += 1;
            }
        }
    }
    let expected: BTreeSet<String> = scenario
        .impressions
        .iter()
        .map(|i| i.impression_id.clone())
        .collect();
    if seen != expected {
        return Err(format!(
            "forwarded impressions {seen:?} != expected {expected:?}"
        ));
    }
    match first_copies.iter().find(|(_, n)| **n > 1) {
        Some((id, n)) => Err(format!("impression {id} forwarded {n} times unflagged")),
        None => Ok(()),
    }
}

/// Replays one shard the way Lambda's event source mapping does: batches of up to
/// `batch_size`, and on a reported failure the next batch starts at the failed record.
#[derive(Debug)]
pub struct ShardPoller {
    pub stream: String,
    pub shard: String,
    records: Vec<Vec<u8>>,
    cursor: usize,
    pub invocations: u32,
    pub redelivered: u64,
}

impl ShardPoller {
    pub fn new(stream: &str, shard: &str, records: Vec<Vec<u8>>) -> Self {
        ShardPoller {
            stream: stream.into(),
            shard: shard.into(),
            records,
            cursor: 0,
            invocations: 0,
            redelivered: 0,
        }
    }

    pub fn drained(&self) -> bool {
        self.cursor >= self.records.len()
    }

    /// The next batch, as the event source mapping would deliver it.
    pub fn next_batch(&self, batch_size: usize) -> Vec<InputRecord> {
        let end = (self.cursor + batch_size.max(1)).min(self.records.len());
        (self.cursor..end)
            .map(|i| InputRecord {
                position: SourcePosition {
                    stream: self.stream.clone(),
                    shard: self.shard.clone(),
                    // Opaque, zero-padded like real ones; never parsed as a number.
                    sequence_number: format!("4960{i:020}"),
                    sub_sequence_number: None,
                },
                data: self.records[i].clone(),
                invalid_base64: None,
                // Scenario times are fixed in the past: no arrival, no bound ahead of it.
                arrival_ms: None,
            })
            .collect()
    }

    /// Advances past the batch, or to its first failed record.
    pub fn checkpoint(&mut self, batch_len: usize, first_failure: Option<usize>) {
        self.invocations += 1;
        match first_failure {
            Some(f) => {
                self.redelivered += (batch_len - f) as u64;
                self.cursor += f;
            }
            None => self.cursor += batch_len,
        }
    }
}

/// How a wrapped port misbehaves: each call fails with probability `rate`, at most `budget`
/// times in all, so every scenario terminates.
#[derive(Debug)]
pub struct FaultPlan {
    rng: Mutex<Rng>,
    rate: f64,
    budget: Mutex<u32>,
    injected: Mutex<u32>,
}

impl FaultPlan {
    pub fn new(seed: u64, rate: f64, budget: u32) -> Self {
        FaultPlan {
            rng: Mutex::new(Rng::new(seed)),
            rate,
            budget: Mutex::new(budget),
            injected: Mutex::new(0),
        }
    }

    /// Whether to fail this call, and a second random bit for the failure mode.
    fn roll(&self) -> Option<bool> {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let mut budget = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        if *budget > 0 && rng.chance(self.rate) {
            *budget -= 1;
            *self.injected.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            Some(rng.chance(0.5))
        } else {
            None
        }
    }

    pub fn injected(&self) -> u32 {
        *self.injected.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An output stream with partial `PutRecords` failures: failed entries are not forwarded, the
/// rest go to the real sink, and the results line up as Kinesis' would.
pub struct FaultySink<K> {
    pub inner: K,
    pub plan: FaultPlan,
}

impl<K: RecordSink> RecordSink for FaultySink<K> {
    async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<EntryResult>, PortError> {
        let fail: Vec<bool> = records.iter().map(|_| self.plan.roll().is_some()).collect();
        let forward: Vec<OutRecord> = records
            .iter()
            .zip(&fail)
            .filter(|(_, f)| !**f)
            .map(|(r, _)| r.clone())
            .collect();
        let mut forwarded = if forward.is_empty() {
            Vec::new()
        } else {
            self.inner.put_records(&forward).await?
        }
        .into_iter();
        Ok(fail
            .iter()
            .map(|&f| {
                if f {
                    EntryResult::Failed {
                        code: "ProvisionedThroughputExceededException".into(),
                        message: "injected partial failure".into(),
                    }
                } else {
                    forwarded.next().unwrap_or(EntryResult::Failed {
                        code: "InternalFailure".into(),
                        message: "missing result".into(),
                    })
                }
            })
            .collect())
    }
}

/// A dead-letter destination that fails some puts before writing.
pub struct FaultyDeadLetters<D> {
    pub inner: D,
    pub plan: FaultPlan,
}

impl<D: DeadLetterSink> DeadLetterSink for FaultyDeadLetters<D> {
    async fn put(&self, letter: &DeadLetter) -> Result<(), PortError> {
        match self.plan.roll() {
            Some(_) => Err(PortError::Unavailable("injected: S3 503 SlowDown".into())),
            None => self.inner.put(letter).await,
        }
    }
}

/// The distinct pair keys of some joined records.
pub fn pair_keys(records: &[JoinedRecord]) -> BTreeSet<(String, String)> {
    records
        .iter()
        .map(|r| (r.impression_id.clone(), r.click_id.clone()))
        .collect()
}

/// The keyed stream in memory: records placed on `shards` evenly split shards by their
/// explicit hash key (as Kinesis places them), each with a growing sequence number and the
/// clock's arrival time.
#[derive(Debug)]
pub struct MemoryKeyedStream {
    pub stream: String,
    shards: Vec<Mutex<Vec<InputRecord>>>,
    clock: std::sync::atomic::AtomicI64,
    next: std::sync::atomic::AtomicU64,
}

impl MemoryKeyedStream {
    pub fn new(stream: &str, shards: usize, start_ms: i64) -> Self {
        MemoryKeyedStream {
            stream: stream.into(),
            shards: (0..shards.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
            clock: std::sync::atomic::AtomicI64::new(start_ms),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn step(&self) -> u128 {
        (u128::MAX / self.shards.len() as u128).saturating_add(1)
    }

    /// The shard id of shard `i`.
    pub fn shard_id(i: usize) -> String {
        format!("shardId-{i:012}")
    }

    /// Each shard's bucket range, as `ListShards`' hash key ranges give it.
    pub fn ranges(&self) -> FixedShardRanges {
        let step = self.step();
        let n = self.shards.len();
        FixedShardRanges(
            (0..n)
                .filter_map(|i| {
                    let start = step * i as u128;
                    let end = if i + 1 == n {
                        u128::MAX
                    } else {
                        step * (i as u128 + 1) - 1
                    };
                    BucketRange::from_hash_range(&start.to_string(), &end.to_string())
                        .map(|r| (Self::shard_id(i), r))
                })
                .collect(),
        )
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Advances the arrival clock.
    pub fn tick(&self, ms: i64) {
        self.clock
            .fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sets the arrival clock (never backwards).
    pub fn set_clock(&self, ms: i64) {
        self.clock
            .fetch_max(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// Records of shard `i` from `from`, at most `max`.
    pub fn read(&self, i: usize, from: usize, max: usize) -> Vec<InputRecord> {
        let records = self.shards[i].lock().unwrap_or_else(|p| p.into_inner());
        records.iter().skip(from).take(max).cloned().collect()
    }

    pub fn len(&self, i: usize) -> usize {
        self.shards[i]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        (0..self.shards.len()).all(|i| self.len(i) == 0)
    }
}

impl RecordSink for MemoryKeyedStream {
    async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<EntryResult>, PortError> {
        use std::sync::atomic::Ordering::SeqCst;
        let step = self.step();
        for r in records {
            let key: u128 = r
                .explicit_hash_key
                .as_deref()
                .and_then(|k| k.parse().ok())
                .ok_or_else(|| {
                    PortError::Rejected("keyed record without ExplicitHashKey".into())
                })?;
            let i = ((key / step) as usize).min(self.shards.len() - 1);
            let n = self.next.fetch_add(1, SeqCst);
            self.shards[i]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(InputRecord {
                    position: SourcePosition {
                        stream: self.stream.clone(),
                        shard: Self::shard_id(i),
                        sequence_number: format!("4970{n:020}"),
                        sub_sequence_number: None,
                    },
                    data: r.data.clone(),
                    invalid_base64: None,
                    arrival_ms: Some(self.clock.load(SeqCst)),
                });
        }
        Ok(vec![EntryResult::Accepted; records.len()])
    }
}

/// A state log that throttles before a write, or loses the response after writing.
pub struct FaultyLog<L> {
    pub inner: L,
    pub plan: FaultPlan,
}

impl<L: StateLog> StateLog for FaultyLog<L> {
    async fn read(&self, log: &str, from: u64) -> Result<Vec<Slot>, PortError> {
        self.inner.read(log, from).await
    }

    async fn put(&self, log: &str, slot: &Slot) -> Result<PutSlot, PortError> {
        match self.plan.roll() {
            Some(true) => Err(PortError::Throttled(
                "injected: ProvisionedThroughputExceededException".into(),
            )),
            Some(false) => {
                self.inner.put(log, slot).await?;
                Err(PortError::Unavailable(
                    "injected: response lost after the write".into(),
                ))
            }
            None => self.inner.put(log, slot).await,
        }
    }

    async fn logs(&self) -> Result<Vec<String>, PortError> {
        self.inner.logs().await
    }

    async fn register(&self, log: &str) -> Result<(), PortError> {
        self.inner.register(log).await
    }

    async fn ack(&self, log: &str, n: u64) -> Result<(), PortError> {
        match self.plan.roll() {
            Some(_) => Err(PortError::Unavailable("injected: ack lost".into())),
            None => self.inner.ack(log, n).await,
        }
    }

    async fn acked(&self, log: &str) -> Result<Option<u64>, PortError> {
        self.inner.acked(log).await
    }

    async fn last(&self, log: &str) -> Result<Option<Slot>, PortError> {
        self.inner.last(log).await
    }

    /// Cold pages and ledger items: throttled, or written with the response lost.
    async fn put_blob(&self, blob: &Blob) -> Result<(), PortError> {
        match self.plan.roll() {
            Some(true) => Err(PortError::Throttled(
                "injected: ProvisionedThroughputExceededException".into(),
            )),
            Some(false) => {
                self.inner.put_blob(blob).await?;
                Err(PortError::Unavailable(
                    "injected: response lost after the write".into(),
                ))
            }
            None => self.inner.put_blob(blob).await,
        }
    }

    async fn blobs(&self, pk: &str, lo: u128, hi: u128) -> Result<Vec<Blob>, PortError> {
        self.inner.blobs(pk, lo, hi).await
    }
}

/// How [`run_keyed`] disturbs the joiner.
#[derive(Debug, Clone, Copy, Default)]
pub struct Disturbance {
    /// Chance per keyed batch that the execution environment is replaced first (memory lost).
    pub restart: f64,
    /// Chance per keyed batch that a second invocation processes the same batch at the same
    /// time (Lambda's occasional duplicate invocation, or a timed-out one still running).
    pub duplicate: f64,
    /// Chance per keyed batch that another execution environment (the twin, with whatever
    /// memory it has) gets it: Lambda does not pin a shard to an environment.
    pub switch: f64,
}

/// Runs the scenario through the router and the keyed joiner until every stream is drained:
/// the input pollers and the keyed stream's pollers interleave by the seed; `twin` is a second
/// joiner instance on the same ports, used for duplicate invocations.
#[allow(clippy::too_many_arguments)]
pub async fn run_keyed<K, D, L, R, J, E>(
    router: &BatchRouter<K, D>,
    keyed: &MemoryKeyedStream,
    joiner: &KeyedJoiner<L, R, J, E>,
    twin: &KeyedJoiner<L, R, J, E>,
    scenario: &Scenario,
    seed: u64,
    max_batch: usize,
    disturb: Disturbance,
    max_invocations: u32,
) -> Result<u32, String>
where
    K: RecordSink,
    D: DeadLetterSink,
    L: StateLog,
    R: ShardRanges,
    J: RecordSink,
    E: DeadLetterSink,
{
    let mut rng = Rng::new(seed ^ 0x6E7);
    let mut imps = ShardPoller::new(
        &router.config.impressions_stream,
        "shardId-000000000000",
        scenario.impression_stream.clone(),
    );
    let mut clicks = ShardPoller::new(
        &router.config.clicks_stream,
        "shardId-000000000000",
        scenario.click_stream.clone(),
    );
    let mut cursors = vec![0usize; keyed.shard_count()];
    let mut invocations = 0u32;
    let mut now_ms = 1_795_169_800_000i64;
    loop {
        let keyed_ready: Vec<usize> = (0..cursors.len())
            .filter(|&i| cursors[i] < keyed.len(i))
            .collect();
        if imps.drained() && clicks.drained() && keyed_ready.is_empty() {
            return Ok(invocations);
        }
        if invocations >= max_invocations {
            return Err(format!(
                "not drained after {max_invocations} invocations (keyed cursors {cursors:?})"
            ));
        }
        invocations += 1;
        keyed.tick(1 + rng.below(300) as i64);
        now_ms += 1 + rng.below(300) as i64;
        let choice = rng.below(3);
        let input = if choice == 0 && !imps.drained() {
            Some(&mut imps)
        } else if choice == 1 && !clicks.drained() {
            Some(&mut clicks)
        } else {
            None
        };
        match (input, keyed_ready.is_empty()) {
            (Some(poller), _) => {
                let batch = poller.next_batch(1 + rng.below(max_batch as u64) as usize);
                let report = router.process(&batch, now_ms).await;
                poller.checkpoint(batch.len(), report.first_failure);
            }
            (None, false) => {
                let i = keyed_ready[rng.below(keyed_ready.len() as u64) as usize];
                let batch = keyed.read(i, cursors[i], 1 + rng.below(max_batch as u64) as usize);
                if rng.chance(disturb.restart) {
                    joiner.forget().await;
                }
                let report = if rng.chance(disturb.duplicate) {
                    let (a, b) = futures::join!(
                        joiner.process(&batch, now_ms),
                        twin.process(&batch, now_ms)
                    );
                    // Lambda sees one of the two; take either at random.
                    if rng.chance(0.5) {
                        a
                    } else {
                        b
                    }
                } else if rng.chance(disturb.switch) {
                    twin.process(&batch, now_ms).await
                } else {
                    joiner.process(&batch, now_ms).await
                };
                match report.first_failure {
                    Some(f) => cursors[i] += f,
                    None => cursors[i] += batch.len(),
                }
            }
            (None, true) => {}
        }
    }
}

/// Checks the joined stream against the reference: every pair and impression present, and at
/// most one copy of each not flagged `recovered` (the lake lands a flagged copy only if absent).
pub fn check_exactly_once(
    records: &[OutRecord],
    scenario: &Scenario,
    rules: &JoinRules,
) -> Result<(), String> {
    let expected = pair_keys(&scenario.reference_join(rules));
    let mut unflagged: std::collections::BTreeMap<(String, String), u32> = Default::default();
    let mut seen = BTreeSet::new();
    for r in decode_stream(records) {
        if let JoinedStreamRecord::Click(c) = r {
            let key = (c.impression_id.clone(), c.click_id.clone());
            if !c.recovered {
                *unflagged.entry(key.clone()).or_default() += 1;
            }
            seen.insert(key);
        }
    }
    if seen != expected {
        let missing: Vec<_> = expected.difference(&seen).collect();
        let extra: Vec<_> = seen.difference(&expected).collect();
        return Err(format!("pairs missing {missing:?}, unexpected {extra:?}"));
    }
    if let Some((k, n)) = unflagged.iter().find(|(_, n)| **n > 1) {
        return Err(format!("pair {k:?} emitted {n} times unflagged"));
    }
    check_forwarded_impressions(records, scenario)
}

/// A joiner configuration for tests: streams `impressions`, `clicks` and `joined`, table
/// `state`, bucket `bucket`, and `emit_max_attempts` attempts per output entry.
pub fn test_config(emit_max_attempts: u32) -> crate::config::JoinerConfig {
    let attempts = emit_max_attempts.to_string();
    crate::config::JoinerConfig::from_lookup(|k| {
        Some(
            match k {
                "IMPRESSIONS_STREAM_NAME" => "impressions",
                "CLICKS_STREAM_NAME" => "clicks",
                "JOINED_STREAM_NAME" => "joined",
                "STATE_LOG_TABLE_NAME" => "state-log",
                "DEAD_LETTER_BUCKET" => "bucket",
                "EMIT_MAX_ATTEMPTS" => attempts.as_str(),
                _ => return None,
            }
            .to_owned(),
        )
    })
    .expect("valid test config")
}
