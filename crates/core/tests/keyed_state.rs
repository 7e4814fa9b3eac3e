//! The keyed joiner's state, case by case: item limits, the deduplication horizon, orphans,
//! replays of records whose outputs were pending, and the fence.

use std::sync::Arc;

use adpipe_core::config::JoinerConfig;
use adpipe_core::in_memory::{FixedShardRanges, MemoryStateLog};
use adpipe_core::in_memory::{MemoryDeadLetterSink, MemoryRecordSink};
use adpipe_core::join::joiner::KeyedJoiner;
use adpipe_core::join::router::BatchRouter;
use adpipe_core::join::state::{
    decode_body, slot_item_size, slots_for_batch, Pending, Stored, DYNAMODB_ITEM_LIMIT,
};
use adpipe_core::model::{Click, Impression, InputRecord, SourcePosition};
use adpipe_core::ports::StateLog;
use adpipe_core::ports::{EntryResult, OutRecord, PortError, RecordSink};
use adpipe_core::testkit::{decode_stream, MemoryKeyedStream};
use adpipe_core::validate::{encode_click, encode_impression};

const T0: i64 = 1_795_169_800_000;
const HOUR: i64 = 3_600_000;

fn config() -> JoinerConfig {
    adpipe_core::testkit::test_config(1)
}

fn impression(id: &str, t: i64) -> Impression {
    Impression {
        ad_id: "ad-1".into(),
        impression_id: id.into(),
        campaign_id: "camp-1".into(),
        publisher_id: "pub-1".into(),
        event_time_ms: t,
        device_type: "mobile".into(),
        geo_location: "US".into(),
        platform: "ios".into(),
        ad_type: "banner".into(),
        bid_price: 1.5,
    }
}

fn click(imp: &str, id: &str, t: i64) -> Click {
    Click {
        ad_id: "ad-1".into(),
        impression_id: imp.into(),
        campaign_id: "camp-1".into(),
        publisher_id: "pub-1".into(),
        event_time_ms: t,
        device_type: "mobile".into(),
        geo_location: "US".into(),
        platform: "ios".into(),
        click_price: 0.2,
        click_id: id.into(),
        click_id_derived: false,
    }
}

fn input(stream: &str, seq: u64, data: Vec<u8>, arrival: i64) -> InputRecord {
    InputRecord {
        position: SourcePosition {
            stream: stream.into(),
            shard: "shardId-000000000000".into(),
            sequence_number: format!("{seq:030}"),
            sub_sequence_number: None,
        },
        data,
        invalid_base64: None,
        arrival_ms: Some(arrival),
    }
}

/// An output stream that refuses everything while `down` is set.
#[derive(Default)]
struct Switchable {
    inner: MemoryRecordSink,
    down: std::sync::atomic::AtomicBool,
}

impl RecordSink for Switchable {
    async fn put_records(&self, records: &[OutRecord]) -> Result<Vec<EntryResult>, PortError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(records
                .iter()
                .map(|_| EntryResult::Failed {
                    code: "ProvisionedThroughputExceededException".into(),
                    message: "down".into(),
                })
                .collect());
        }
        self.inner.put_records(records).await
    }
}

type Joiner<L> = KeyedJoiner<Arc<L>, FixedShardRanges, Arc<Switchable>, Arc<MemoryDeadLetterSink>>;

/// A router and a joiner over one keyed shard, with an in-memory log (or another `L`, such as
/// [`FaultyLog`]).
struct World<L: StateLog = MemoryStateLog> {
    keyed: Arc<MemoryKeyedStream>,
    router: BatchRouter<Arc<MemoryKeyedStream>, Arc<MemoryDeadLetterSink>>,
    joiner: Joiner<L>,
    log: Arc<L>,
    sink: Arc<Switchable>,
    letters: Arc<MemoryDeadLetterSink>,
    cursor: usize,
    seq: u64,
}

impl World {
    fn new() -> Self {
        World::with_log(MemoryStateLog::default())
    }
}

impl<L: StateLog> World<L> {
    fn with_log(log: L) -> Self {
        let keyed = Arc::new(MemoryKeyedStream::new("keyed", 1, T0));
        let letters = Arc::new(MemoryDeadLetterSink::default());
        let log = Arc::new(log);
        let sink = Arc::new(Switchable::default());
        World {
            router: BatchRouter::new(keyed.clone(), letters.clone(), config()),
            joiner: KeyedJoiner::new(
                log.clone(),
                keyed.ranges(),
                sink.clone(),
                letters.clone(),
                config(),
            ),
            keyed,
            log,
            sink,
            letters,
            cursor: 0,
            seq: 0,
        }
    }

    /// Routes records at `at` and runs the joiner over every new keyed record.
    async fn send(&mut self, at: i64, records: Vec<(&str, Vec<u8>)>) -> Option<usize> {
        let batch: Vec<InputRecord> = records
            .into_iter()
            .map(|(stream, data)| {
                self.seq += 1;
                input(stream, self.seq, data, at)
            })
            .collect();
        self.keyed.set_clock(at);
        assert_eq!(self.router.process(&batch, at).await.first_failure, None);
        self.drain(at).await
    }

    async fn drain(&mut self, now: i64) -> Option<usize> {
        let batch = self.keyed.read(0, self.cursor, 1000);
        if batch.is_empty() {
            return None;
        }
        let report = self.joiner.process(&batch, now).await;
        self.cursor += report.first_failure.unwrap_or(batch.len());
        report.first_failure
    }

    fn outputs(&self) -> Vec<adpipe_core::model::JoinedStreamRecord> {
        decode_stream(&self.sink.inner.records())
    }

    fn letters_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.letters
            .letters()
            .values()
            .map(|b| serde_json::from_slice::<serde_json::Value>(b).unwrap())
            .filter(|v| v["kind"] == kind)
            .collect()
    }
}

#[test]
fn a_batch_too_large_for_one_item_is_split_into_slots_below_the_limit() {
    // 3,000 impressions with every string at its 256-byte limit and random content, so
    // compression cannot hide the size.
    let mut seed = 7u64;
    let mut noise = |n: usize| {
        (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                char::from(b'!' + (seed >> 58) as u8 + (seed >> 40) as u8 % 30)
            })
            .collect::<String>()
    };
    let events: Vec<Stored> = (0..3000)
        .map(|i| {
            let mut imp = impression(&format!("imp-{i}-{}", noise(200)), T0);
            imp.campaign_id = noise(256);
            imp.publisher_id = noise(256);
            imp.device_type = noise(256);
            imp.geo_location = noise(256);
            Stored::Impression(imp, T0)
        })
        .collect();
    let pending: Vec<Pending> = events
        .iter()
        .map(|e| match e {
            Stored::Impression(i, _) => Pending::Forward(i.impression_id.clone()),
            Stored::Click(..) => unreachable!(),
        })
        .collect();
    let slots = slots_for_batch(
        5,
        "shardId-0",
        Some("10"),
        Some("20"),
        T0,
        T0,
        events.clone(),
        pending.clone(),
        (None, None),
        0,
    );
    assert!(slots.len() > 3, "{} slots", slots.len());
    let mut back_events = Vec::new();
    let mut back_pending = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        assert_eq!(slot.n, 5 + i as u64);
        let size = slot_item_size("r0000-0063", slot);
        assert!(size <= DYNAMODB_ITEM_LIMIT, "slot {i}: {size} bytes");
        let body = decode_body(&slot.body).unwrap();
        assert_eq!(body.batch_first, 5);
        let want = if i + 1 == slots.len() { "20" } else { "10" };
        assert_eq!(
            body.progress.as_deref(),
            Some(want),
            "only the last slot advances"
        );
        back_events.extend(body.events);
        back_pending.extend(body.pending);
    }
    assert_eq!(back_events, events);
    assert_eq!(back_pending, pending);
}

#[test]
fn slots_and_pages_written_as_json_by_the_previous_version_are_still_read() {
    let events = vec![
        Stored::Impression(impression("imp-1", T0), T0 + 5),
        Stored::Click(click("imp-1", "clk-1", T0 + 10), T0 + 20),
    ];
    let pending = vec![
        Pending::Forward("imp-1".into()),
        Pending::Pair("imp-1".into(), "clk-1".into()),
    ];
    let body = adpipe_core::join::state::SlotBody {
        v: 1,
        shard: "shardId-0".into(),
        progress: Some("10".into()),
        batch_first: 3,
        batch_last: None,
        now_ms: T0 + 20,
        swept_ms: T0,
        events: events.clone(),
        pending: pending.clone(),
        cold_from_ms: None,
        warm_from: None,
    };
    let legacy = |json: Vec<u8>| zstd::bulk::compress(&json, 3).unwrap();
    assert_eq!(
        decode_body(&legacy(serde_json::to_vec(&body).unwrap())).unwrap(),
        body
    );
    let page = legacy(serde_json::to_vec(&events).unwrap());
    assert_eq!(
        adpipe_core::join::state::decode_events(&page).unwrap(),
        events
    );
    // The current format reads back the same, and is smaller.
    let current = adpipe_core::join::state::SlotBody {
        v: adpipe_core::join::state::SLOT_FORMAT,
        ..body.clone()
    };
    let bytes = adpipe_core::join::state::encode_body(&current);
    assert_eq!(decode_body(&bytes).unwrap(), current);
    assert!(bytes.len() < legacy(serde_json::to_vec(&body).unwrap()).len());
    // A JSON body claiming the current format is refused, not misread.
    assert!(matches!(
        decode_body(&legacy(serde_json::to_vec(&current).unwrap())),
        Err(PortError::Corrupt(_))
    ));
}

#[tokio::test]
async fn an_event_past_the_deduplication_horizon_is_dead_lettered_never_emitted() {
    let mut w = World::new();
    let now = T0 + 100 * HOUR;
    // 48 h horizon, 1 h allowed lead: anything before now − 47 h cannot be checked.
    let old = now - 47 * HOUR - 1;
    let ok = now - 47 * HOUR;
    w.send(
        now,
        vec![
            (
                "impressions",
                encode_impression(&impression("imp-old", old)),
            ),
            ("impressions", encode_impression(&impression("imp-ok", ok))),
        ],
    )
    .await;
    let forwarded: Vec<String> = w
        .outputs()
        .into_iter()
        .map(|r| r.key().0.to_owned())
        .collect();
    assert_eq!(forwarded, vec!["imp-ok".to_owned()]);
    let refused: Vec<serde_json::Value> = w
        .letters_of("rejected_group")
        .into_iter()
        .filter(|l| l["reason"] == "past_dedup_horizon")
        .flat_map(|l| l["entries"].as_array().unwrap().clone())
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["kind"], "rejected");
    assert_eq!(refused[0]["reason"], "past_dedup_horizon");
    assert!(refused[0]["data"].as_str().unwrap().contains("imp-old"));
}

#[tokio::test]
async fn a_redelivery_inside_the_horizon_is_recognised_after_a_restart_and_dynamodb_ttl() {
    let mut w = World::new();
    w.send(
        T0,
        vec![("impressions", encode_impression(&impression("imp-1", T0)))],
    )
    .await;
    assert_eq!(w.outputs().len(), 1);
    // 40 hours later, a fresh execution environment; DynamoDB's TTL has deleted nothing it
    // may not (slots live for the horizon plus the grace).
    let later = T0 + 40 * HOUR;
    w.joiner.forget().await;
    w.log.expire(later / 1000);
    assert_eq!(w.log.slot_count(), 1);
    w.send(
        later,
        vec![("impressions", encode_impression(&impression("imp-1", T0)))],
    )
    .await;
    // The repeat is recognised. The fresh environment cannot know whether the last batch's
    // outputs were accepted, so it sends them once more, flagged (the lake drops the copy).
    let unflagged = |w: &World| w.outputs().iter().filter(|r| !r.recovered()).count();
    assert_eq!(unflagged(&w), 1, "{:?}", w.outputs());
    let sent = w.outputs().len();
    // Past the horizon and the TTL, the slot is gone and the repeat is refused, not emitted.
    let much_later = T0 + 100 * HOUR;
    w.log.expire(much_later / 1000);
    assert_eq!(w.log.slot_count(), 0, "TTL deleted the slot");
    w.joiner.forget().await;
    w.send(
        much_later,
        vec![("impressions", encode_impression(&impression("imp-1", T0)))],
    )
    .await;
    assert_eq!(unflagged(&w), 1);
    assert_eq!(w.outputs().len(), sent, "nothing more was emitted");
    assert_eq!(
        w.letters_of("rejected_group")
            .iter()
            .filter(|l| l["reason"] == "past_dedup_horizon")
            .map(|l| l["count"].as_u64().unwrap())
            .sum::<u64>(),
        1
    );
}

#[tokio::test]
async fn an_orphan_click_is_recorded_when_its_retention_ends() {
    let mut w = World::new();
    w.send(
        T0,
        vec![("clicks", encode_click(&click("imp-never", "clk-1", T0)))],
    )
    .await;
    assert!(w.letters_of("orphan").is_empty());
    // A later record moves the clock past the 24 h retention.
    w.send(
        T0 + 25 * HOUR,
        vec![(
            "impressions",
            encode_impression(&impression("imp-2", T0 + 25 * HOUR)),
        )],
    )
    .await;
    let orphans = w.letters_of("orphan");
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    assert_eq!(orphans[0]["click"]["click_id"], "clk-1");
    // A restart does not record it again (the sweep's progress is in the log).
    w.joiner.forget().await;
    w.send(
        T0 + 26 * HOUR,
        vec![(
            "impressions",
            encode_impression(&impression("imp-3", T0 + 26 * HOUR)),
        )],
    )
    .await;
    assert_eq!(w.letters_of("orphan").len(), 1);
}

#[tokio::test]
async fn a_replayed_record_delivers_a_pair_whose_emission_had_failed() {
    let mut w = World::new();
    w.send(
        T0,
        vec![("impressions", encode_impression(&impression("imp-1", T0)))],
    )
    .await;
    // The output stream is down when the click decides the pair: the batch is in the log,
    // its outputs pending, and the batch reports failure.
    w.sink.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = w
        .send(
            T0 + 1000,
            vec![("clicks", encode_click(&click("imp-1", "clk-1", T0 + 500)))],
        )
        .await;
    assert!(failed.is_some());
    // Lambda gives up on it (skips the record) and an operator replays the click onto its
    // input stream: a new record with a new sequence number, in a fresh environment.
    w.cursor += 1;
    w.joiner.forget().await;
    w.sink
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    w.send(
        T0 + 60_000,
        vec![("clicks", encode_click(&click("imp-1", "clk-1", T0 + 500)))],
    )
    .await;
    let pairs: Vec<_> = w
        .outputs()
        .into_iter()
        .filter(|r| r.key().1 == "clk-1")
        .collect();
    assert_eq!(pairs.len(), 1, "{pairs:?}");
    assert!(
        pairs[0].recovered(),
        "may repeat an earlier attempt, so flagged"
    );
}

#[tokio::test]
async fn a_writer_with_stale_memory_loses_the_slot_catches_up_and_repeats_nothing() {
    let mut w = World::new();
    w.send(
        T0,
        vec![("impressions", encode_impression(&impression("imp-1", T0)))],
    )
    .await;
    // Another instance (a duplicate invocation) writes the next slot behind this one's back.
    let other = KeyedJoiner::new(
        w.log.clone(),
        w.keyed.ranges(),
        w.sink.clone(),
        w.letters.clone(),
        config(),
    );
    let batch_records = vec![input(
        "clicks",
        99,
        encode_click(&click("imp-1", "clk-1", T0 + 10)),
        T0 + 10,
    )];
    w.keyed.set_clock(T0 + 10);
    w.router.process(&batch_records, T0 + 10).await;
    let keyed_batch = w.keyed.read(0, w.cursor, 10);
    assert_eq!(
        other.process(&keyed_batch, T0 + 10).await.first_failure,
        None
    );
    // This environment's memory is stale: its write of the next slot finds it taken, it takes
    // its attempt back, catches up from the log, finds the record done, and emits nothing:
    // the other writer acknowledged its outputs.
    let stale = w.joiner.process(&keyed_batch, T0 + 10).await;
    assert_eq!(stale.first_failure, None);
    assert_eq!(stale.counts.skipped, 1);
    assert_eq!(stale.counts.joined, 0);
    let pairs = w
        .outputs()
        .into_iter()
        .filter(|r| r.key().1 == "clk-1")
        .count();
    assert_eq!(pairs, 1, "{:?}", w.outputs());
    assert_eq!(w.log.read("r0000-0063", 0).await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_event_on_a_shard_that_does_not_own_its_bucket_is_dead_lettered_not_joined() {
    // Two shards: a record of a low bucket put (by hand) on the high shard.
    let keyed = Arc::new(MemoryKeyedStream::new("keyed", 2, T0));
    let letters = Arc::new(MemoryDeadLetterSink::default());
    let sink = Arc::new(Switchable::default());
    let joiner = KeyedJoiner::new(
        Arc::new(MemoryStateLog::default()),
        keyed.ranges(),
        sink.clone(),
        letters.clone(),
        config(),
    );
    let imp = impression("imp-stray", T0);
    let bucket = adpipe_core::join::buckets::bucket_of("imp-stray");
    let (record, _) = adpipe_core::join::router::pack(vec![(
        0,
        adpipe_core::join::router::KeyedEvent::new(
            adpipe_core::model::Event::Impression(imp),
            SourcePosition {
                stream: "impressions".into(),
                shard: "shardId-000000000000".into(),
                sequence_number: "1".into(),
                sub_sequence_number: None,
            },
            Some(T0),
        ),
    )])
    .remove(0);
    let wrong = if bucket < adpipe_core::join::buckets::HASH_BUCKETS / 2 {
        1
    } else {
        0
    };
    let batch = vec![InputRecord {
        position: SourcePosition {
            stream: "keyed".into(),
            shard: MemoryKeyedStream::shard_id(wrong),
            sequence_number: "1".into(),
            sub_sequence_number: None,
        },
        data: record.data,
        invalid_base64: None,
        arrival_ms: Some(T0),
    }];
    let report = joiner.process(&batch, T0).await;
    assert_eq!(report.first_failure, None);
    assert!(
        sink.inner.records().is_empty(),
        "nothing joined or forwarded"
    );
    let reasons: Vec<String> = letters
        .letters()
        .values()
        .map(|b| serde_json::from_slice::<serde_json::Value>(b).unwrap()["reason"].to_string())
        .collect();
    assert_eq!(reasons, vec!["\"invalid_keyed_record\"".to_owned()]);
}

/// Routes `records` through `router` onto `keyed` and joins every shard's new records.
async fn route_and_join<L, R, D>(
    router: &BatchRouter<Arc<MemoryKeyedStream>, Arc<MemoryDeadLetterSink>>,
    keyed: &MemoryKeyedStream,
    joiner: &KeyedJoiner<L, R, Arc<Switchable>, D>,
    cursors: &mut [usize],
    records: Vec<(&str, Vec<u8>)>,
    at: i64,
) where
    L: StateLog,
    R: adpipe_core::ports::ShardRanges,
    D: adpipe_core::ports::DeadLetterSink,
{
    keyed.set_clock(at);
    let batch: Vec<InputRecord> = records
        .into_iter()
        .enumerate()
        .map(|(i, (stream, data))| input(stream, at as u64 + i as u64, data, at))
        .collect();
    assert_eq!(router.process(&batch, at).await.first_failure, None);
    for (i, cursor) in cursors.iter_mut().enumerate() {
        let batch = keyed.read(i, *cursor, 1000);
        if !batch.is_empty() {
            let report = joiner.process(&batch, at).await;
            *cursor += report.first_failure.unwrap_or(batch.len());
        }
    }
}

#[tokio::test]
async fn after_a_split_the_children_know_their_parents_events_and_send_what_it_left_pending() {
    let log = Arc::new(MemoryStateLog::default());
    let sink = Arc::new(Switchable::default());
    let letters = Arc::new(MemoryDeadLetterSink::default());
    // The parent: one keyed shard owning every bucket.
    let parent_stream = Arc::new(MemoryKeyedStream::new("keyed", 1, T0));
    let parent_router = BatchRouter::new(parent_stream.clone(), letters.clone(), config());
    let parent = KeyedJoiner::new(
        log.clone(),
        parent_stream.ranges(),
        sink.clone(),
        letters.clone(),
        config(),
    );
    let mut cursors = vec![0];
    route_and_join(
        &parent_router,
        &parent_stream,
        &parent,
        &mut cursors,
        vec![
            ("impressions", encode_impression(&impression("imp-a", T0))),
            ("clicks", encode_click(&click("imp-b", "clk-b", T0 + 5))),
        ],
        T0,
    )
    .await;
    // Its last batch's output is never accepted: pending in its log, not acknowledged.
    sink.down.store(true, std::sync::atomic::Ordering::SeqCst);
    route_and_join(
        &parent_router,
        &parent_stream,
        &parent,
        &mut cursors,
        vec![(
            "impressions",
            encode_impression(&impression("imp-c", T0 + 10)),
        )],
        T0 + 10,
    )
    .await;
    sink.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let forwarded = |sink: &Switchable| -> Vec<(String, bool)> {
        decode_stream(&sink.inner.records())
            .into_iter()
            .map(|r| (r.key().0.to_owned(), r.recovered()))
            .collect()
    };
    assert_eq!(forwarded(&sink), vec![("imp-a".to_owned(), false)]);

    // The split: two child shards, new environments, their own logs.
    let children = Arc::new(MemoryKeyedStream::new("keyed", 2, T0 + 20));
    let child_router = BatchRouter::new(children.clone(), letters.clone(), config());
    let child = KeyedJoiner::new(
        log.clone(),
        children.ranges(),
        sink.clone(),
        letters.clone(),
        config(),
    );
    let mut cursors = vec![0, 0];
    route_and_join(
        &child_router,
        &children,
        &child,
        &mut cursors,
        vec![
            // A repeat of a parent's impression, the partner of a parent's click, and one
            // event per child so both children run.
            ("impressions", encode_impression(&impression("imp-a", T0))),
            ("impressions", encode_impression(&impression("imp-b", T0))),
            (
                "impressions",
                encode_impression(&impression("imp-d0", T0 + 20)),
            ),
            (
                "impressions",
                encode_impression(&impression("imp-d1", T0 + 20)),
            ),
            (
                "impressions",
                encode_impression(&impression("imp-d2", T0 + 20)),
            ),
            (
                "impressions",
                encode_impression(&impression("imp-d3", T0 + 20)),
            ),
        ],
        T0 + 20,
    )
    .await;
    let got = forwarded(&sink);
    let count = |id: &str| got.iter().filter(|(k, _)| k == id).count();
    assert_eq!(
        count("imp-a"),
        1,
        "the repeat is recognised across the split: {got:?}"
    );
    assert_eq!(
        count("imp-b"),
        2,
        "imp-b forwarded and its pair with the parent's click"
    );
    assert!(
        got.contains(&("imp-c".to_owned(), true)),
        "the parent's pending output is sent by the child that owns it, flagged: {got:?}"
    );
    assert_eq!(
        log.logs().await.unwrap().len(),
        3,
        "the parent's log and two children's"
    );
}

#[tokio::test]
async fn a_warm_window_old_entries_leave_memory_and_late_events_find_them_in_the_cold_pages() {
    let mut w = World::new();
    w.joiner.rules.evict_min_entries = 1;
    let warm = w.joiner.rules.warm_ms;
    let retention = w.joiner.config.rules.retention_ms;
    // 50 impressions on time, and a click whose impression is not there (yet, or ever).
    let imps: Vec<Impression> = (0..50)
        .map(|n| impression(&format!("imp-{n}"), T0 + n))
        .collect();
    let mut first: Vec<(&str, Vec<u8>)> = imps
        .iter()
        .map(|i| ("impressions", encode_impression(i)))
        .collect();
    first.push(("clicks", encode_click(&click("imp-x", "clk-x", T0 + 100))));
    first.push(("clicks", encode_click(&click("imp-o", "clk-o", T0 + 200))));
    w.send(T0, first).await;
    assert_eq!(w.joiner.entries_in_memory().await, 52);

    // Two warm windows later, on-time traffic: everything before leaves memory for the pages.
    let later = T0 + 2 * warm;
    w.send(
        later,
        vec![(
            "impressions",
            encode_impression(&impression("imp-now", later)),
        )],
    )
    .await;
    assert!(
        w.log.blob_count() > 0,
        "cold pages and the ledger are written"
    );
    // They leave memory once a slot records the eviction: the next batch's.
    w.send(
        later + 500,
        vec![(
            "impressions",
            encode_impression(&impression("imp-now-b", later + 500)),
        )],
    )
    .await;
    assert_eq!(
        w.joiner.entries_in_memory().await,
        2,
        "only the warm entries stay"
    );

    // Late events: a repeat of imp-3, a click on imp-7, and imp-x, whose click came first.
    let late = vec![
        ("impressions", encode_impression(&imps[3])),
        (
            "clicks",
            encode_click(&click("imp-7", "clk-7", T0 + 7 + 10_000)),
        ),
        (
            "impressions",
            encode_impression(&impression("imp-x", T0 + 90)),
        ),
    ];
    w.send(later + 1_000, late).await;
    // A new environment rebuilds from the warm slots only, and still knows them.
    w.joiner.forget().await;
    w.send(
        later + 2_000,
        vec![(
            "impressions",
            encode_impression(&impression("imp-now2", later + 2_000)),
        )],
    )
    .await;
    assert_eq!(
        w.joiner.entries_in_memory().await,
        5,
        "the rebuild read the warm slots only: imp-now, imp-now-b, imp-7's click, imp-x, imp-now2"
    );
    let again = vec![
        ("impressions", encode_impression(&imps[5])),
        (
            "impressions",
            encode_impression(&impression("imp-x", T0 + 90)),
        ),
        (
            "clicks",
            encode_click(&click("imp-9", "clk-9", T0 + 9 + 5_000)),
        ),
    ];
    w.send(later + 3_000, again).await;

    let outputs = w.outputs();
    let mut forwards = std::collections::BTreeMap::new();
    let mut pairs = Vec::new();
    for r in &outputs {
        match r {
            adpipe_core::model::JoinedStreamRecord::Impression(i) => {
                assert!(!i.recovered, "{i:?}");
                *forwards.entry(i.impression_id.clone()).or_insert(0) += 1;
            }
            adpipe_core::model::JoinedStreamRecord::Click(c) => {
                assert!(!c.recovered, "{c:?}");
                pairs.push((c.impression_id.clone(), c.click_id.clone()));
            }
        }
    }
    assert_eq!(forwards.len(), 54, "every impression forwarded");
    assert!(forwards.values().all(|n| *n == 1), "{forwards:?}");
    pairs.sort();
    assert_eq!(
        pairs,
        [("imp-7", "clk-7"), ("imp-9", "clk-9"), ("imp-x", "clk-x")]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    assert!(w.letters_of("rejected").is_empty());

    // When the clicks' retention ends, the one that never met its impression is an orphan,
    // read from the ledger; the one that met it late is not. Once, across a restart.
    let end = T0 + retention + 3 * warm;
    w.send(
        end,
        vec![(
            "impressions",
            encode_impression(&impression("imp-end", end)),
        )],
    )
    .await;
    w.joiner.forget().await;
    w.send(
        end + 1_000,
        vec![(
            "impressions",
            encode_impression(&impression("imp-end2", end + 1_000)),
        )],
    )
    .await;
    let orphans = w.letters_of("orphan");
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    assert_eq!(orphans[0]["click"]["click_id"], "clk-o", "{orphans:?}");
}

/// A range idle past the deduplication horizon and the TTL grace: DynamoDB's TTL deletes its
/// slots, but its acknowledgement (written without a TTL) stays. A new batch must not be
/// numbered below it: it used to start again at slot 0, the acknowledgement covered it, and a
/// crash between its slot and its own acknowledgement lost its outputs (the next environment
/// took them as sent).
#[tokio::test]
async fn after_an_idle_range_lost_its_slots_to_ttl_a_new_batch_is_numbered_above_the_ack() {
    let mut w = World::new();
    for i in 0..3 {
        let t = T0 + i * 1_000;
        w.send(
            t,
            vec![(
                "impressions",
                encode_impression(&impression(&format!("imp-{i}"), t)),
            )],
        )
        .await;
    }
    assert_eq!(w.outputs().len(), 3);
    let idle = T0 + 100 * HOUR;
    w.log.expire(idle / 1000);
    assert_eq!(w.log.slot_count(), 0, "TTL deleted every slot");
    // A fresh environment decides a pair while the output stream is down: the batch is in the
    // log, its outputs pending, and it reports failure.
    w.joiner.forget().await;
    w.sink.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = w
        .send(
            idle,
            vec![
                ("impressions", encode_impression(&impression("imp-9", idle))),
                ("clicks", encode_click(&click("imp-9", "clk-9", idle + 500))),
            ],
        )
        .await;
    assert!(failed.is_some());
    // It crashes before acknowledging; the next environment gets the redelivery.
    w.joiner.forget().await;
    w.sink
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(w.drain(idle + 2_000).await, None);
    let outputs = w.outputs();
    let keys: Vec<_> = outputs.iter().map(|r| r.key()).collect();
    assert!(
        keys.iter().any(|k| k.1 == "clk-9"),
        "the pair was sent: {keys:?}"
    );
}

/// The joined stream refuses a pair until its events pass the deduplication horizon: the pair
/// can no longer be built, and it used to vanish with a log line. It is recorded, once, under
/// `dead-letter/lost-output/` (and counted as `OutputsLost`).
#[tokio::test]
async fn an_output_whose_events_passed_the_horizon_unsent_is_recorded_not_dropped() {
    let mut w = World::new();
    w.send(
        T0,
        vec![("impressions", encode_impression(&impression("imp-1", T0)))],
    )
    .await;
    w.sink.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = w
        .send(
            T0 + 1_000,
            vec![("clicks", encode_click(&click("imp-1", "clk-1", T0 + 500)))],
        )
        .await;
    assert!(failed.is_some());
    // Two days and more later the stream takes records again; the pair's events have left the
    // state by then.
    w.sink
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let later = T0 + 50 * HOUR;
    w.send(
        later,
        vec![(
            "impressions",
            encode_impression(&impression("imp-2", later)),
        )],
    )
    .await;
    let lost = w.letters_of("lost_output");
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0]["impression_id"], "imp-1");
    assert_eq!(lost[0]["click_id"], "clk-1");
    assert!(!w.outputs().iter().any(|r| r.key().1 == "clk-1"));
    // Nothing is recorded twice by the batches after.
    w.send(
        later + 1_000,
        vec![(
            "impressions",
            encode_impression(&impression("imp-3", later)),
        )],
    )
    .await;
    assert_eq!(w.letters_of("lost_output").len(), 1);
}

/// How a slot put fails in [`FaultyLog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotFault {
    /// Throttled after the SDK's retries: nothing written.
    ThrottledBefore,
    /// Written, but the answer was lost (a timeout).
    LostAnswer,
    /// Written, and the SDK's retry of the lost answer found the number taken.
    TakenOnRetry,
}

/// The in-memory log, failing one slot put as told.
#[derive(Default)]
struct FaultyLog {
    inner: MemoryStateLog,
    fault: std::sync::Mutex<Option<(u64, SlotFault)>>,
}

impl StateLog for FaultyLog {
    async fn read(
        &self,
        log: &str,
        from: u64,
    ) -> Result<Vec<adpipe_core::join::state::Slot>, PortError> {
        self.inner.read(log, from).await
    }
    async fn put(
        &self,
        log: &str,
        slot: &adpipe_core::join::state::Slot,
    ) -> Result<adpipe_core::join::state::PutSlot, PortError> {
        let fault = {
            let mut f = self.fault.lock().unwrap();
            match *f {
                Some((n, kind)) if n == slot.n => f.take().map(|_| kind),
                _ => None,
            }
        };
        match fault {
            None => self.inner.put(log, slot).await,
            Some(SlotFault::ThrottledBefore) => Err(PortError::Throttled("slot put".into())),
            Some(SlotFault::LostAnswer) => {
                self.inner.put(log, slot).await?;
                Err(PortError::Unavailable("the answer was lost".into()))
            }
            Some(SlotFault::TakenOnRetry) => {
                self.inner.put(log, slot).await?;
                self.inner.put(log, slot).await
            }
        }
    }
    async fn logs(&self) -> Result<Vec<String>, PortError> {
        self.inner.logs().await
    }
    async fn register(&self, log: &str) -> Result<(), PortError> {
        self.inner.register(log).await
    }
    async fn ack(&self, log: &str, n: u64) -> Result<(), PortError> {
        self.inner.ack(log, n).await
    }
    async fn acked(&self, log: &str) -> Result<Option<u64>, PortError> {
        self.inner.acked(log).await
    }
    async fn last(&self, log: &str) -> Result<Option<adpipe_core::join::state::Slot>, PortError> {
        self.inner.last(log).await
    }
    async fn put_blob(&self, blob: &adpipe_core::join::state::Blob) -> Result<(), PortError> {
        self.inner.put_blob(blob).await
    }
    async fn blobs(
        &self,
        pk: &str,
        lo: u128,
        hi: u128,
    ) -> Result<Vec<adpipe_core::join::state::Blob>, PortError> {
        self.inner.blobs(pk, lo, hi).await
    }
}

/// A batch too large for one item is written as several slots, one put each. A put that fails
/// part way (throttled before writing, written with its answer lost, written and then read
/// back as taken by the SDK's retry) used to leave the first slots' events stored with their
/// outputs in the missing slots: the redelivery found the events stored, took them as repeats
/// and emitted nothing for them. At every slot of the batch, with the redelivery in the same
/// environment and in a fresh one: every impression is forwarded and every pair sent, none of
/// them twice unflagged, and the log's readers take nothing of the batch that stopped.
#[tokio::test]
async fn a_batch_of_several_slots_stopped_at_any_slot_loses_no_output() {
    const IMPRESSIONS: usize = 1_500;
    // Strings at their 256-byte limit with random content, so the batch needs several slots.
    let mut rng = adpipe_core::rng::Rng::new(5);
    let mut noise = |n: usize| -> String {
        (0..n)
            .map(|_| char::from(b'a' + rng.below(26) as u8))
            .collect()
    };
    let mut records = Vec::new();
    let mut expected = std::collections::BTreeSet::new();
    for i in 0..IMPRESSIONS {
        let id = format!("imp-{i:05}");
        let mut imp = impression(&id, T0);
        imp.campaign_id = noise(200);
        imp.publisher_id = noise(200);
        records.push(("impressions", encode_impression(&imp)));
        expected.insert((id.clone(), String::new()));
        if i % 10 == 0 {
            let c = format!("clk-{i:05}");
            records.push(("clicks", encode_click(&click(&id, &c, T0 + 100))));
            expected.insert((id, c));
        }
    }
    // How many slots the batch takes, from a run without faults.
    let slots_needed = {
        let (_, log, ..) = fault_run(&records, None, false).await;
        log.inner.slot_count() as u64
    };
    assert!(slots_needed >= 3, "{slots_needed} slots");
    for fault in [
        SlotFault::ThrottledBefore,
        SlotFault::LostAnswer,
        SlotFault::TakenOnRetry,
    ] {
        for at in 0..slots_needed {
            for fresh in [false, true] {
                let (outputs, _, first_failed) =
                    fault_run(&records, Some((at, fault)), fresh).await;
                let case = format!("{fault:?} at slot {at} of {slots_needed}, fresh {fresh}");
                let mut unflagged = std::collections::BTreeMap::new();
                let mut seen = std::collections::BTreeSet::new();
                for r in &outputs {
                    let key = (r.key().0.to_owned(), r.key().1.to_owned());
                    seen.insert(key.clone());
                    if !r.recovered() {
                        *unflagged.entry(key).or_insert(0) += 1;
                    }
                }
                if fault != SlotFault::TakenOnRetry {
                    assert!(first_failed, "{case}: the fault failed the batch");
                }
                let missing: Vec<_> = expected.difference(&seen).take(3).collect();
                assert!(
                    missing.is_empty(),
                    "{case}: {} of {} outputs missing, e.g. {missing:?}",
                    expected.difference(&seen).count(),
                    expected.len()
                );
                assert_eq!(seen.len(), expected.len(), "{case}: nothing extra");
                let twice: Vec<_> = unflagged.iter().filter(|(_, n)| **n > 1).take(3).collect();
                assert!(twice.is_empty(), "{case}: sent twice unflagged: {twice:?}");
            }
        }
    }
}

/// Routes `records` in one batch, runs the joiner over the keyed stream with `fault` armed,
/// then (after forgetting the environment's memory if `fresh`) over the redelivery until
/// the stream is drained. The joined stream, the log and whether the first attempt failed.
async fn fault_run(
    records: &[(&str, Vec<u8>)],
    fault: Option<(u64, SlotFault)>,
    fresh: bool,
) -> (
    Vec<adpipe_core::model::JoinedStreamRecord>,
    Arc<FaultyLog>,
    bool,
) {
    let World {
        keyed,
        letters,
        log,
        sink,
        router,
        joiner,
        ..
    } = World::with_log(FaultyLog::default());
    let batch: Vec<InputRecord> = records
        .iter()
        .enumerate()
        .map(|(i, (stream, data))| input(stream, i as u64 + 1, data.clone(), T0 + 1_000))
        .collect();
    keyed.set_clock(T0 + 1_000);
    assert_eq!(router.process(&batch, T0 + 1_000).await.first_failure, None);
    *log.fault.lock().unwrap() = fault;
    let mut cursor = 0;
    let mut first_failed = false;
    for attempt in 0..20 {
        let batch = keyed.read(0, cursor, 10_000);
        if batch.is_empty() {
            break;
        }
        let report = joiner.process(&batch, T0 + 2_000 + attempt).await;
        if let Some(failed) = report.first_failure {
            first_failed |= attempt == 0;
            cursor += failed;
            if fresh {
                joiner.forget().await;
            }
        } else {
            cursor += batch.len();
        }
    }
    assert!(
        keyed.read(0, cursor, 1).is_empty(),
        "the keyed stream drained"
    );
    assert!(letters.letters().is_empty(), "no dead letter");
    (decode_stream(&sink.inner.records()), log, first_failed)
}

/// A throttled slot put fails the batch and takes it back in memory; the memory stays (it
/// used to be dropped, and every throttle cost a rebuild of the warm window from one partition
/// key, itself the likeliest to be throttled). The redelivery is decided from the same memory:
/// no rebuild, the pair and the forward sent once.
#[tokio::test]
async fn a_throttled_slot_put_keeps_the_memory_and_the_redelivery_needs_no_rebuild() {
    let World {
        keyed,
        log,
        sink,
        router,
        joiner,
        ..
    } = World::with_log(FaultyLog::default());
    let route = |seq: u64, stream: &'static str, data: Vec<u8>| {
        let (router, keyed) = (&router, &keyed);
        async move {
            let at = T0 + seq as i64 * 1_000;
            keyed.set_clock(at);
            let batch = vec![input(stream, seq, data, at)];
            assert_eq!(router.process(&batch, at).await.first_failure, None);
        }
    };
    route(
        1,
        "impressions",
        encode_impression(&impression("imp-1", T0)),
    )
    .await;
    let first = joiner.process(&keyed.read(0, 0, 100), T0 + 1_000).await;
    assert_eq!(first.first_failure, None);
    assert_eq!(first.counts.rebuilds, 1, "the cold start");
    route(
        2,
        "clicks",
        encode_click(&click("imp-1", "clk-1", T0 + 500)),
    )
    .await;
    *log.fault.lock().unwrap() = Some((1, SlotFault::ThrottledBefore));
    let batch = keyed.read(0, 1, 100);
    let throttled = joiner.process(&batch, T0 + 2_000).await;
    assert_eq!(throttled.first_failure, Some(0));
    assert_eq!(throttled.counts.rebuilds, 0);
    let redo = joiner.process(&batch, T0 + 3_000).await;
    assert_eq!(redo.first_failure, None);
    assert_eq!(redo.counts.rebuilds, 0, "the memory was kept");
    let keys: Vec<_> = decode_stream(&sink.inner.records())
        .iter()
        .map(|r| (r.key().0.to_owned(), r.key().1.to_owned(), r.recovered()))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("imp-1".to_owned(), String::new(), false),
            ("imp-1".to_owned(), "clk-1".to_owned(), false)
        ]
    );
}

/// An environment whose memory stopped at a slot older than the log's warm slots (another
/// environment has since written batches and moved their entries to the cold pages) loses the
/// fence on its next batch. It rebuilds from the warm slots instead of reading every slot
/// since its head, which after an idle environment can be hours of them.
#[tokio::test]
async fn a_writer_whose_head_is_older_than_the_warm_slots_rebuilds_rather_than_reading_them_all() {
    let mut w = World::new();
    w.joiner.rules.evict_min_entries = 1;
    let warm = w.joiner.rules.warm_ms;
    let mut stale = KeyedJoiner::new(
        w.log.clone(),
        w.keyed.ranges(),
        w.sink.clone(),
        w.letters.clone(),
        config(),
    );
    stale.rules.evict_min_entries = 1;
    // The stale environment writes the first batch, then sits idle.
    let imp = |id: &str, t: i64| ("impressions", encode_impression(&impression(id, t)));
    let batch: Vec<InputRecord> = vec![input("impressions", 1, imp("imp-a", T0).1, T0)];
    w.seq = 1;
    w.keyed.set_clock(T0);
    assert_eq!(w.router.process(&batch, T0).await.first_failure, None);
    let first = w.keyed.read(0, 0, 100);
    assert_eq!(stale.process(&first, T0).await.first_failure, None);
    w.cursor = first.len();
    // The other environment writes batches two warm windows apart (each evicts the one
    // before), then one more (its slot records where the warm slots begin): the stale
    // environment's next slot number is before them.
    let mid = T0 + 2 * warm;
    let later = mid + 2 * warm;
    w.send(mid, vec![imp("imp-b", mid)]).await;
    w.send(later, vec![imp("imp-c", later)]).await;
    w.send(later + 1_000, vec![imp("imp-d", later + 1_000)])
        .await;
    assert!(w.log.blob_count() > 0, "entries went to the cold pages");
    // The stale environment gets the next batch.
    let at = later + 2_000;
    w.keyed.set_clock(at);
    let next = vec![input("impressions", 9, imp("imp-e", at).1, at)];
    assert_eq!(w.router.process(&next, at).await.first_failure, None);
    let batch = w.keyed.read(0, w.cursor, 100);
    let report = stale.process(&batch, at).await;
    assert_eq!(report.first_failure, None);
    assert_eq!(report.counts.rebuilds, 1, "rebuilt, not caught up");
    let forwarded: Vec<_> = w
        .outputs()
        .iter()
        .map(|r| (r.key().0.to_owned(), r.recovered()))
        .collect();
    let ids = ["imp-a", "imp-b", "imp-c", "imp-d", "imp-e"];
    assert_eq!(
        forwarded,
        ids.iter()
            .map(|i| (i.to_string(), false))
            .collect::<Vec<_>>()
    );
}

/// An operator replays seven days of traffic into a stack whose horizon is 48 hours: every
/// event is past it and refused. It used to write one S3 object per event (seven days at
/// 1,000 events/s is about 600 million PUTs); now one per keyed record, each holding every
/// refused event of that record with its own source position. The router packs one input
/// batch's events of one bucket into a keyed record (at most 64 KiB), so an input batch of
/// 3,000 events makes 64 objects, not 3,000. The redelivery rewrites the same objects.
#[tokio::test]
async fn a_replay_past_the_horizon_writes_one_dead_letter_per_keyed_record_not_per_event() {
    const EVENTS: usize = 3_000;
    let mut w = World::new();
    let now = T0 + 200 * HOUR;
    let old = T0;
    let records: Vec<(&str, Vec<u8>)> = (0..EVENTS)
        .map(|i| {
            let imp = impression(&format!("imp-{i:05}"), old + i as i64);
            ("impressions", encode_impression(&imp))
        })
        .collect();
    w.seq = 0;
    let batch: Vec<InputRecord> = records
        .iter()
        .enumerate()
        .map(|(i, (s, d))| input(s, i as u64 + 1, d.clone(), now))
        .collect();
    w.keyed.set_clock(now);
    assert_eq!(w.router.process(&batch, now).await.first_failure, None);
    let keyed = w.keyed.read(0, 0, 10_000);
    let report = w.joiner.process(&keyed, now).await;
    assert_eq!(report.first_failure, None);
    assert_eq!(report.counts.rejected_total(), EVENTS as u64);
    let objects = w.letters.letters();
    assert_eq!(objects.len(), keyed.len(), "one object per keyed record");
    assert_eq!(objects.len(), 64, "one per state bucket of the input batch");
    let mut refused = std::collections::BTreeSet::new();
    for (key, body) in &objects {
        assert!(key.ends_with(".past_dedup_horizon.json"), "{key}");
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["kind"], "rejected_group");
        let entries = v["entries"].as_array().unwrap();
        assert_eq!(v["count"].as_u64().unwrap() as usize, entries.len());
        for e in entries {
            assert_eq!(e["reason"], "past_dedup_horizon");
            assert_eq!(e["stream"], "impressions");
            refused.insert(e["sequence_number"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(
        refused.len(),
        EVENTS,
        "every event once, with its source position"
    );
    assert!(w.outputs().is_empty());
    // The redelivery of the same keyed batch (a fresh environment) rewrites the same objects.
    w.joiner.forget().await;
    let again = w.joiner.process(&keyed, now + 1_000).await;
    assert_eq!(again.first_failure, None);
    assert_eq!(
        w.letters.letters().keys().collect::<Vec<_>>(),
        objects.keys().collect::<Vec<_>>()
    );
}

/// Two attempts at one batch, one invoked as the records arrive and one ten hours later (a
/// stream that lags), write the same slot: its clock and its TTL come from the records'
/// arrival on the keyed stream, never from the invocation. The invocation's clock used to be
/// the slot's clock, which a rebuild adopts for every later decision.
#[tokio::test]
async fn a_batch_is_written_the_same_whatever_the_invocations_clock() {
    let mut written = Vec::new();
    for lag in [0, 10 * HOUR] {
        let w = World::new();
        let batch = vec![
            input(
                "impressions",
                1,
                encode_impression(&impression("imp-1", T0)),
                T0,
            ),
            input(
                "clicks",
                2,
                encode_click(&click("imp-1", "clk-1", T0 + 10)),
                T0,
            ),
        ];
        w.keyed.set_clock(T0);
        assert_eq!(w.router.process(&batch, T0).await.first_failure, None);
        let keyed = w.keyed.read(0, 0, 100);
        let report = w.joiner.process(&keyed, T0 + 1_000 + lag).await;
        assert_eq!(report.first_failure, None);
        let logs = w.log.logs().await.unwrap();
        let slots = w.log.read(&logs[0], 0).await.unwrap();
        assert_eq!(slots.len(), 1);
        assert_eq!(decode_body(&slots[0].body).unwrap().now_ms, T0);
        written.push(slots);
    }
    assert_eq!(written[0], written[1]);
}

/// While the joined stream takes nothing, every batch used to be decided all the same, and its
/// outputs added to the pending ones, each pinning its entry in memory, until the environment
/// ran out of memory. Past a quarter of the memory budget of pending outputs, a batch is
/// refused unread (after the pending ones are tried again): nothing new is decided, the log
/// does not grow. Once the stream takes records again, the pending outputs go first, then
/// the refused batch is decided; every output is sent, none twice unflagged.
#[tokio::test]
async fn pending_outputs_past_their_bound_refuse_new_input_until_the_stream_takes_them() {
    let mut w = World::new();
    w.joiner.rules.max_entries = 8; // at most 2 pending
    w.sink.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = w
        .send(
            T0,
            vec![
                ("impressions", encode_impression(&impression("imp-1", T0))),
                ("clicks", encode_click(&click("imp-1", "clk-1", T0 + 10))),
            ],
        )
        .await;
    assert!(failed.is_some(), "decided and written, not sent");
    assert_eq!(w.log.slot_count(), 1);
    w.send(
        T0 + 1_000,
        vec![(
            "impressions",
            encode_impression(&impression("imp-2", T0 + 1_000)),
        )],
    )
    .await;
    let batch = w.keyed.read(0, w.cursor, 1000);
    let refused = w.joiner.process(&batch, T0 + 2_000).await;
    assert_eq!(
        refused.first_failure,
        Some(0),
        "refused from its first record"
    );
    assert!(
        refused.failures[&0].contains("2 joined records pending, at most 2"),
        "{:?}",
        refused.failures
    );
    assert_eq!(w.log.slot_count(), 1, "nothing new decided");
    assert!(w.outputs().is_empty());
    w.sink
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(w.drain(T0 + 3_000).await, None);
    let mut keys: Vec<_> = w
        .outputs()
        .iter()
        .filter(|r| !r.recovered())
        .map(|r| (r.key().0.to_owned(), r.key().1.to_owned()))
        .collect();
    keys.sort();
    let all: std::collections::BTreeSet<_> = w
        .outputs()
        .iter()
        .map(|r| (r.key().0.to_owned(), r.key().1.to_owned()))
        .collect();
    let want = [("imp-1", ""), ("imp-1", "clk-1"), ("imp-2", "")]
        .map(|(a, b)| (a.to_owned(), b.to_owned()));
    assert_eq!(all.into_iter().collect::<Vec<_>>(), want.to_vec());
    keys.dedup();
    assert_eq!(
        keys.len(),
        w.outputs().iter().filter(|r| !r.recovered()).count(),
        "none twice unflagged"
    );
}

/// Memory is bounded by the budget, not by rate × warm window. Past `max_entries` the oldest
/// entries leave for the cold pages before their warm window ends (counted as
/// `EntriesSpilledEarly`), and pages read back for the batch's events bring back only what
/// those events need, so memory stays near the budget; clicks whose impressions were spilled
/// find them in the pages and every pair is sent. Before, the budget only dropped other
/// shards' memories, and one busy shard's warm window grew until the environment died (here:
/// 4,000 entries held against a budget of 300).
#[tokio::test]
async fn past_the_memory_budget_entries_spill_to_the_pages_early_and_every_pair_is_found() {
    const BATCHES: i64 = 40;
    const PER_BATCH: i64 = 100;
    const BUDGET: usize = 300;
    let mut w = World::new();
    w.joiner.rules.max_entries = BUDGET;
    let mut expected = std::collections::BTreeSet::new();
    let (mut spilled, mut peak) = (0u64, 0usize);
    for b in 0..BATCHES {
        let at = T0 + b * 1_000;
        let mut records = Vec::new();
        for i in 0..PER_BATCH {
            let id = format!("imp-{b:03}-{i:03}");
            records.push(("impressions", encode_impression(&impression(&id, at + i))));
            expected.insert((id, String::new()));
        }
        // Clicks on impressions of ten batches before (long spilled by then), 1 s after them.
        if b >= 10 {
            for i in (0..PER_BATCH).step_by(10) {
                let id = format!("imp-{:03}-{i:03}", b - 10);
                let c = format!("clk-{:03}-{i:03}", b - 10);
                let t = at - 10_000 + i + 1_000;
                records.push(("clicks", encode_click(&click(&id, &c, t))));
                expected.insert((id, c));
            }
        }
        let batch: Vec<InputRecord> = records
            .into_iter()
            .map(|(s, d)| {
                w.seq += 1;
                input(s, w.seq, d, at)
            })
            .collect();
        w.keyed.set_clock(at);
        assert_eq!(w.router.process(&batch, at).await.first_failure, None);
        let keyed = w.keyed.read(0, w.cursor, 10_000);
        let report = w.joiner.process(&keyed, at).await;
        assert_eq!(report.first_failure, None, "batch {b}");
        w.cursor += keyed.len();
        spilled += report.counts.spilled_early;
        peak = peak.max(w.joiner.entries_in_memory().await);
    }
    assert!(spilled > 0, "entries spilled early");
    // The budget, one batch's new entries and the clicks' impressions read back, and the last
    // pass's entries, which leave with the next slot.
    let bound = BUDGET + 3 * PER_BATCH as usize;
    assert!(peak <= bound, "peak {peak} entries, bound {bound}");
    let (_, _, read_units) = w.log.usage();
    assert!(read_units > 0.0, "the spilled impressions were read back");
    let sent: std::collections::BTreeSet<_> = w
        .outputs()
        .iter()
        .map(|r| (r.key().0.to_owned(), r.key().1.to_owned()))
        .collect();
    assert_eq!(sent, expected);
    assert_eq!(w.outputs().len(), expected.len(), "each once");
}
