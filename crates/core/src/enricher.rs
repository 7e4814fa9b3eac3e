//! One joined-stream batch through the enricher, generic over the ports: decode, validate and
//! enrich each record, drop in-batch repeats, and append each table's rows idempotently.
//!
//! Failure contract: the two appends are each idempotent per input range, so any failure
//! reports the batch's first record and Lambda redelivers the whole batch; a table that had
//! already committed it recognises the range and skips.

use std::collections::HashSet;

use futures::stream::{self, StreamExt};

use crate::dead_letter;
use crate::enrich::{
    enrich_click, enrich_impression, EnrichRules, EnrichedClick, EnrichedImpression,
};
use crate::lake::{clicks_batch, impressions_batch};
use crate::metrics::Counts;
use crate::model::{InputRecord, JoinedStreamRecord, JoinedWire, JOINED_SCHEMA_VERSION};
use crate::ports::{
    AppendReport, DeadLetter, DeadLetterSink, InputRange, LakeAppend, LakeTable, PortError,
    TableWriter,
};
use crate::validate::{RejectReason, Rejection, TimeBounds};

/// The function name in dead-letter keys and metrics.
pub const FUNCTION: &str = "enricher";

/// The enricher's settings that the core needs.
#[derive(Debug, Clone, PartialEq)]
pub struct EnricherSettings {
    pub rules: EnrichRules,
    pub dead_letter_prefix: String,
    pub max_in_flight: usize,
    /// The joiner's event-time bounds, checked again on joined records (one written by an
    /// older joiner, or put on the stream by hand, is held to the same contract).
    pub time_bounds: TimeBounds,
    /// Distinct event days (UTC) one batch may land. Every day is a partition, so a file per
    /// table and campaign: the bound keeps the files of one batch bounded whatever times it
    /// carries. Records of a further day are dead-lettered (`too_many_days_in_batch`).
    pub max_days_per_batch: usize,
}

const DAY_MS: i64 = 86_400_000;

impl Row {
    /// The row's key in its table: the impression id, and the click id (empty for an
    /// impression).
    fn key(&self) -> (String, String) {
        match self {
            Row::Click(c, _) => (c.pair.impression_id.clone(), c.pair.click_id.clone()),
            Row::Impression(imp, _) => (imp.impression.impression_id.clone(), String::new()),
        }
    }

    /// The row's event times: the partition time first.
    fn times(&self) -> [(&'static str, i64); 2] {
        match self {
            Row::Click(c, _) => [
                ("impression_time", c.impression_time_ms),
                ("click_time", c.click_time_ms),
            ],
            Row::Impression(i, _) => [
                ("impression_time", i.impression_time_ms),
                ("impression_time", i.impression_time_ms),
            ],
        }
    }
}

/// What an enricher batch came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnrichReport {
    /// Set when the batch must be redelivered (from its first record).
    pub failed: Option<String>,
    pub counts: Counts,
    pub clicks: AppendReport,
    pub impressions: AppendReport,
}

/// The enricher's batch processor.
pub struct BatchEnricher<T, D> {
    pub lake: T,
    pub dead_letters: D,
    pub settings: EnricherSettings,
}

/// Decodes one joined-stream record into the records it carries (one, or a pack of forwarded
/// impressions).
pub fn decode_joined(data: &[u8]) -> Result<Vec<JoinedStreamRecord>, Rejection> {
    let text = std::str::from_utf8(data).map_err(|e| {
        Rejection::new(
            RejectReason::InvalidUtf8,
            format!("record is not UTF-8: {e}"),
        )
    })?;
    let wire: JoinedWire = serde_json::from_str(text).map_err(|e| {
        Rejection::new(
            RejectReason::InvalidJson,
            format!("not a joined-stream record: {e}"),
        )
    })?;
    let records = wire.into_records();
    for record in &records {
        let version = match record {
            JoinedStreamRecord::Click(c) => c.schema_version,
            JoinedStreamRecord::Impression(i) => i.schema_version,
        };
        if version != JOINED_SCHEMA_VERSION {
            return Err(Rejection::new(
                RejectReason::WrongType,
                format!("schema_version {version} is not {JOINED_SCHEMA_VERSION}"),
            ));
        }
    }
    Ok(records)
}

enum Row {
    Click(EnrichedClick, bool),
    Impression(EnrichedImpression, bool),
}

/// What a batch's records come to, in record order: the rows to land (a repeat within the
/// batch keeps its first copy) and the dead letters of the records rejected.
#[derive(Default)]
struct Enriched {
    rows: Vec<Row>,
    rejected: Vec<DeadLetter>,
    /// The keys of `rows`.
    seen: HashSet<(String, String)>,
    /// The event days of `rows` ([`EnricherSettings::max_days_per_batch`]).
    days: HashSet<i64>,
}

impl<T: TableWriter, D: DeadLetterSink> BatchEnricher<T, D> {
    pub fn new(lake: T, dead_letters: D, settings: EnricherSettings) -> Self {
        BatchEnricher {
            lake,
            dead_letters,
            settings,
        }
    }

    /// The row if its times are within the bounds and its day is one of the batch's first
    /// [`EnricherSettings::max_days_per_batch`] (in record order, so a redelivery of the same
    /// batch decides the same way).
    fn within_bounds(
        &self,
        row: Row,
        arrival_ms: Option<i64>,
        days: &mut HashSet<i64>,
    ) -> Result<Row, Rejection> {
        let times = row.times();
        for (field, t) in times {
            self.settings.time_bounds.check(field, t, arrival_ms)?;
        }
        let day = times[0].1.div_euclid(DAY_MS);
        if !days.contains(&day) {
            if days.len() >= self.settings.max_days_per_batch {
                return Err(Rejection::new(
                    RejectReason::TooManyDaysInBatch,
                    format!(
                        "the batch already lands {} distinct event days (MAX_DAYS_PER_BATCH); \
                         this record's day would be one more",
                        days.len()
                    ),
                ));
            }
            days.insert(day);
        }
        Ok(row)
    }

    /// Processes one batch from one joined-stream shard, in sequence order.
    pub async fn process(&self, records: &[InputRecord], now_ms: i64) -> EnrichReport {
        let mut report = EnrichReport::default();
        report.counts.records_in = records.len() as u64;
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return report;
        };
        let input = InputRange {
            stream: first.position.stream.clone(),
            shard: first.position.shard.clone(),
            first_sequence: first.position.sequence_number.clone(),
            last_sequence: last.position.sequence_number.clone(),
        };

        // Decode and enrich; repeats within the batch keep their first copy. A repeat on the
        // stream always comes after its original (same partition key, same shard).
        let mut enriched = Enriched::default();
        for record in records {
            self.enrich_record(record, now_ms, &mut enriched, &mut report.counts);
        }

        // Dead letters first: their keys are positions, so a redelivery rewrites them.
        if let Err(reason) = self.put_dead_letters(&enriched.rejected).await {
            report.failed = Some(reason);
            return report;
        }
        let (clicks, impressions) = match table_appends(enriched.rows, &input, &mut report.counts) {
            Ok(appends) => appends,
            Err(reason) => {
                report.failed = Some(reason);
                return report;
            }
        };
        self.append_tables(clicks, impressions, records.len(), &mut report)
            .await;
        if let Some(reason) = &report.failed {
            tracing::warn!(%reason, records = records.len(), "enricher batch failed; Lambda will redeliver it");
        }
        report
    }

    /// Decodes, enriches and checks one record (each record of a pack), adding its rows or its
    /// dead letters to `enriched`.
    fn enrich_record(
        &self,
        record: &InputRecord,
        now_ms: i64,
        enriched: &mut Enriched,
        counts: &mut Counts,
    ) {
        let decoded = match &record.invalid_base64 {
            Some(detail) => Err(Rejection::new(RejectReason::InvalidBase64, detail.clone())),
            None => decode_joined(&record.data),
        };
        let inner = match decoded {
            Ok(inner) => inner,
            Err(rejection) => {
                counts.reject(rejection.reason);
                enriched
                    .rejected
                    .push(self.dead_letter(record, None, &rejection, now_ms));
                return;
            }
        };
        let packed = inner.len() > 1;
        for (part, r) in inner.into_iter().enumerate() {
            // A pack's record is dead-lettered on its own, with its place in the pack.
            let data = packed.then(|| serde_json::to_vec(&r).expect("a record encodes"));
            let row = self
                .enrich_row(r, now_ms)
                .and_then(|row| self.within_bounds(row, record.arrival_ms, &mut enriched.days));
            match row {
                Err(rejection) => {
                    counts.reject(rejection.reason);
                    let part = data.as_deref().map(|data| (part, data));
                    enriched
                        .rejected
                        .push(self.dead_letter(record, part, &rejection, now_ms));
                }
                Ok(row) => {
                    if enriched.seen.insert(row.key()) {
                        enriched.rows.push(row);
                    } else {
                        counts.duplicates += 1;
                    }
                }
            }
        }
    }

    /// The enriched row of one joined record.
    fn enrich_row(&self, record: JoinedStreamRecord, now_ms: i64) -> Result<Row, Rejection> {
        let recovered = record.recovered();
        match record {
            JoinedStreamRecord::Click(c) => {
                enrich_click(&self.settings.rules, c, now_ms).map(|e| Row::Click(e, recovered))
            }
            JoinedStreamRecord::Impression(imp) => {
                enrich_impression(&self.settings.rules, imp, now_ms)
                    .map(|e| Row::Impression(e, recovered))
            }
        }
    }

    /// The dead letter of a rejected record, or of one record of a pack (`part`: its place in
    /// the pack and its encoding).
    fn dead_letter(
        &self,
        record: &InputRecord,
        part: Option<(usize, &[u8])>,
        rejection: &Rejection,
        now_ms: i64,
    ) -> DeadLetter {
        let prefix = &self.settings.dead_letter_prefix;
        match part {
            Some((part, data)) => dead_letter::rejected_part(
                prefix,
                FUNCTION,
                &record.position,
                part,
                data,
                rejection,
                now_ms,
            ),
            None => dead_letter::rejected(
                prefix,
                FUNCTION,
                &record.position,
                &record.data,
                rejection,
                now_ms,
            ),
        }
    }

    /// Writes the dead letters, `max_in_flight` at a time; `Err`: why one was not written.
    async fn put_dead_letters(&self, rejected: &[DeadLetter]) -> Result<(), String> {
        let dlq: Vec<Result<(), PortError>> = stream::iter(rejected.iter())
            .map(|letter| async move { self.dead_letters.put(letter).await })
            .buffer_unordered(self.settings.max_in_flight.max(1))
            .collect()
            .await;
        match dlq.into_iter().find(Result::is_err) {
            Some(Err(e)) => Err(format!("dead letter not written: {e}")),
            _ => Ok(()),
        }
    }

    /// Appends both tables' rows concurrently, into `report`; a failure of either fails the
    /// batch (each append is idempotent per input range, so the redelivery is safe).
    async fn append_tables(
        &self,
        clicks: Option<LakeAppend>,
        impressions: Option<LakeAppend>,
        records: usize,
        report: &mut EnrichReport,
    ) {
        let append = |a: Option<LakeAppend>| async move {
            match a {
                Some(a) => self.lake.append(a).await,
                None => Ok(AppendReport::default()),
            }
        };
        let (c, i) = futures::join!(append(clicks), append(impressions));
        match (c, i) {
            (Ok(c), Ok(i)) => {
                report.counts.duplicates += c.duplicates_dropped + i.duplicates_dropped;
                report.clicks = c;
                report.impressions = i;
            }
            (Err(e), _) | (_, Err(e)) => {
                report.failed = Some(format!("lake append failed: {e}"));
                report.counts.failed = records as u64;
            }
        }
    }
}

/// The rows split by table and counted, as each table's append (`None` for a table without
/// rows); `Err`: why a table's Arrow batch could not be built.
fn table_appends(
    rows: Vec<Row>,
    input: &InputRange,
    counts: &mut Counts,
) -> Result<(Option<LakeAppend>, Option<LakeAppend>), String> {
    let mut clicks = Vec::new();
    let mut impressions = Vec::new();
    for row in rows {
        match row {
            Row::Click(c, r) => clicks.push((c, r)),
            Row::Impression(i, r) => impressions.push((i, r)),
        }
    }
    counts.clicks = clicks.len() as u64;
    counts.impressions = impressions.len() as u64;

    let clicks_append = if clicks.is_empty() {
        None
    } else {
        let (rows, flags): (Vec<EnrichedClick>, Vec<bool>) = clicks.into_iter().unzip();
        let batch =
            clicks_batch(&rows).map_err(|e| format!("cannot build the clicks batch: {e}"))?;
        Some(LakeAppend {
            table: LakeTable::Clicks,
            input: input.clone(),
            rows: batch,
            keys: rows
                .iter()
                .map(|r| (r.pair.impression_id.clone(), r.pair.click_id.clone()))
                .collect(),
            in_doubt: flags,
        })
    };
    let impressions_append = if impressions.is_empty() {
        None
    } else {
        let (rows, flags): (Vec<EnrichedImpression>, Vec<bool>) = impressions.into_iter().unzip();
        let batch = impressions_batch(&rows)
            .map_err(|e| format!("cannot build the impressions batch: {e}"))?;
        Some(LakeAppend {
            table: LakeTable::Impressions,
            input: input.clone(),
            rows: batch,
            keys: rows
                .iter()
                .map(|r| (r.impression.impression_id.clone(), String::new()))
                .collect(),
            in_doubt: flags,
        })
    };
    Ok((clicks_append, impressions_append))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_memory::MemoryDeadLetterSink;
    use crate::model::{Impression, ImpressionRecord, SourcePosition};
    use std::sync::Mutex;

    /// Counts the rows each append carries.
    #[derive(Default)]
    struct Rows(Mutex<usize>);

    impl TableWriter for Rows {
        async fn append(&self, append: LakeAppend) -> Result<AppendReport, PortError> {
            let n = append.rows.num_rows();
            *self.0.lock().unwrap() += n;
            Ok(AppendReport {
                rows_written: n as u64,
                ..AppendReport::default()
            })
        }
    }

    fn impression_on_day(n: usize, day: i64) -> InputRecord {
        let imp = Impression {
            ad_id: "ad-1".into(),
            impression_id: format!("imp-{n}"),
            campaign_id: "camp-1".into(),
            publisher_id: "pub-1".into(),
            event_time_ms: crate::validate::DEFAULT_EARLIEST_EVENT_MS + day * DAY_MS + 1_000,
            device_type: "mobile".into(),
            geo_location: "US".into(),
            platform: "ios".into(),
            ad_type: "banner".into(),
            bid_price: 1.0,
        };
        InputRecord {
            position: SourcePosition {
                stream: "joined".into(),
                shard: "shardId-000000000000".into(),
                sequence_number: format!("{n:020}"),
                sub_sequence_number: None,
            },
            data: serde_json::to_vec(&JoinedStreamRecord::Impression(ImpressionRecord::new(
                &imp, false,
            )))
            .unwrap(),
            invalid_base64: None,
            arrival_ms: Some(crate::validate::DEFAULT_EARLIEST_EVENT_MS + 4_000 * DAY_MS),
        }
    }

    #[tokio::test]
    async fn a_packs_bad_record_is_dead_lettered_alone_with_its_place_and_the_rest_land() {
        let enricher = BatchEnricher::new(
            Rows::default(),
            MemoryDeadLetterSink::default(),
            EnricherSettings {
                rules: EnrichRules::default(),
                dead_letter_prefix: "dead-letter/".into(),
                max_in_flight: 4,
                time_bounds: TimeBounds::default(),
                max_days_per_batch: 3,
            },
        );
        let mut record = impression_on_day(0, 0);
        let one: serde_json::Value = serde_json::from_slice(&record.data).unwrap();
        let mut bad = one.clone();
        bad["bid_price"] = serde_json::json!(-1.0);
        let inner: Vec<serde_json::Value> = [one.clone(), bad, one]
            .into_iter()
            .enumerate()
            .map(|(n, mut v)| {
                v["impression_id"] = serde_json::json!(format!("imp-pack-{n}"));
                v.as_object_mut().unwrap().remove("type");
                v
            })
            .collect();
        record.data =
            serde_json::to_vec(&serde_json::json!({"type": "impressions", "impressions": inner}))
                .unwrap();
        let report = enricher.process(&[record], 0).await;
        assert_eq!(report.failed, None);
        assert_eq!(
            *enricher.lake.0.lock().unwrap(),
            2,
            "the two good records land"
        );
        let letters = enricher.dead_letters.letters();
        assert_eq!(letters.len(), 1);
        let (key, body) = letters.iter().next().unwrap();
        assert!(key.ends_with("-1.json"), "{key}");
        let body: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(body["part"], 1);
        assert!(body["data"].as_str().unwrap().contains("imp-pack-1"));
    }

    #[tokio::test]
    async fn one_batch_lands_at_most_max_days_and_dead_letters_the_records_of_further_days() {
        let enricher = BatchEnricher::new(
            Rows::default(),
            MemoryDeadLetterSink::default(),
            EnricherSettings {
                rules: EnrichRules::default(),
                dead_letter_prefix: "dead-letter/".into(),
                max_in_flight: 4,
                time_bounds: TimeBounds::default(),
                max_days_per_batch: 3,
            },
        );
        // A broken clock: every record on another day, with repeats of the first days between.
        let days = [0, 1, 0, 2, 700, 1, 3000, 2, 5];
        let records: Vec<InputRecord> = days
            .iter()
            .enumerate()
            .map(|(n, d)| impression_on_day(n, *d))
            .collect();
        let report = enricher.process(&records, 0).await;
        assert_eq!(report.failed, None);
        assert_eq!(*enricher.lake.0.lock().unwrap(), 6, "days 0, 1 and 2 land");
        assert_eq!(
            report
                .counts
                .rejected
                .get(&RejectReason::TooManyDaysInBatch),
            Some(&3),
            "days 700, 3000 and 5 are dead-lettered"
        );
        assert_eq!(enricher.dead_letters.letters().len(), 3);
    }
}
