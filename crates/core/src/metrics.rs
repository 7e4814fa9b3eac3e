//! Per-batch counters and their CloudWatch Embedded Metric Format (EMF) log line.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::validate::RejectReason;

/// What one batch did. Emitted once per batch, never per record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Kinesis records in the batch (a KPL aggregate is one).
    pub records_in: u64,
    /// User records unpacked from KPL aggregates (a plain record is not counted here).
    pub user_records: u64,
    pub impressions: u64,
    pub clicks: u64,
    /// Joined records accepted by the output stream (new pairs and completed re-emissions).
    pub joined: u64,
    /// First-seen impressions forwarded to the joined stream (for the lake), accepted.
    pub forwarded: u64,
    /// New arrivals stored with no partner yet.
    pub buffered: u64,
    /// Redelivered events recognised from the state and not applied again.
    pub duplicates: u64,
    /// Pairs whose partners met after the retention (recorded, not joined).
    pub late: u64,
    /// Same impression id, but not attributed (other ad, or outside the window).
    pub unmatched: u64,
    /// Pending pairs a redelivery left to the invocation that decided them.
    pub deferred: u64,
    pub rejected: BTreeMap<RejectReason, u64>,
    /// Records this invocation could not finish (reported back so Lambda redelivers them).
    pub failed: u64,
    /// Output entries sent again after a partial `PutRecords` failure.
    pub emit_retries: u64,
    /// Emitted pairs whose `emitted` mark could not be written (a later redelivery may
    /// re-emit them; the lake deduplicates by pair key).
    pub mark_failures: u64,
    /// Clicks whose retention ended with no impression joined (recorded as orphans).
    pub orphaned: u64,
    /// Keyed records already in the join state's log (a redelivery), skipped.
    pub skipped: u64,
    /// Impression ids whose events left memory for the cold pages (the warm window).
    pub evicted: u64,
    /// Outputs the joined stream did not take before their events passed the deduplication
    /// horizon: recorded under `dead-letter/lost-output/`, never sent.
    pub outputs_lost: u64,
    /// Times a range's memory was built from the log (a cold start, a range held for the
    /// first time or again after the memory budget dropped it, a writer too far behind to
    /// catch up slot by slot).
    pub rebuilds: u64,
    /// Of [`Counts::evicted`], the impression ids that left memory before their warm window
    /// ended because the memory budget was passed.
    pub spilled_early: u64,
}

impl Counts {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    pub fn reject(&mut self, reason: RejectReason) {
        *self.rejected.entry(reason).or_default() += 1;
    }
}

/// Adds another batch's counts, field by field (rejections reason by reason): how the tools
/// total a run.
impl std::ops::AddAssign<&Counts> for Counts {
    fn add_assign(&mut self, c: &Counts) {
        // Destructured, so that a new field cannot be left out of the sum.
        let Counts {
            records_in,
            user_records,
            impressions,
            clicks,
            joined,
            forwarded,
            buffered,
            duplicates,
            late,
            unmatched,
            deferred,
            rejected,
            failed,
            emit_retries,
            mark_failures,
            orphaned,
            skipped,
            evicted,
            outputs_lost,
            rebuilds,
            spilled_early,
        } = c;
        self.records_in += records_in;
        self.user_records += user_records;
        self.impressions += impressions;
        self.clicks += clicks;
        self.joined += joined;
        self.forwarded += forwarded;
        self.buffered += buffered;
        self.duplicates += duplicates;
        self.late += late;
        self.unmatched += unmatched;
        self.deferred += deferred;
        for (reason, n) in rejected {
            *self.rejected.entry(*reason).or_default() += n;
        }
        self.failed += failed;
        self.emit_retries += emit_retries;
        self.mark_failures += mark_failures;
        self.orphaned += orphaned;
        self.skipped += skipped;
        self.evicted += evicted;
        self.outputs_lost += outputs_lost;
        self.rebuilds += rebuilds;
        self.spilled_early += spilled_early;
    }
}

/// The invocation a metrics line belongs to: its Lambda request id (a property of the line, so
/// CloudWatch Logs Insights finds the invocation's other logs from a metric's data point) and
/// whether it was the execution environment's first (`ColdStart`, a metric).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invocation {
    pub request_id: String,
    pub cold_start: bool,
}

impl Invocation {
    pub fn new(request_id: impl Into<String>, cold_start: bool) -> Self {
        Invocation {
            request_id: request_id.into(),
            cold_start,
        }
    }
}

/// Whether an execution environment has been invoked yet: the first [`ColdStart::take`]
/// answers true, every later one false.
#[derive(Debug, Default)]
pub struct ColdStart(std::sync::atomic::AtomicBool);

impl ColdStart {
    pub const fn new() -> Self {
        ColdStart(std::sync::atomic::AtomicBool::new(false))
    }

    pub fn take(&self) -> bool {
        !self.0.swap(true, std::sync::atomic::Ordering::Relaxed)
    }
}

/// The EMF JSON line for a batch: namespace `namespace`, dimension `Function`.
pub fn emf_line(
    namespace: &str,
    function: &str,
    counts: &Counts,
    timestamp_ms: i64,
    invocation: &Invocation,
) -> String {
    let mut values: Vec<(String, u64)> = vec![
        ("RecordsIn".into(), counts.records_in),
        ("UserRecords".into(), counts.user_records),
        ("Impressions".into(), counts.impressions),
        ("Clicks".into(), counts.clicks),
        ("Joined".into(), counts.joined),
        ("ImpressionsForwarded".into(), counts.forwarded),
        ("Buffered".into(), counts.buffered),
        ("DuplicatesIgnored".into(), counts.duplicates),
        ("Late".into(), counts.late),
        ("Unmatched".into(), counts.unmatched),
        ("RecoveryDeferred".into(), counts.deferred),
        ("Rejected".into(), counts.rejected_total()),
        ("Failed".into(), counts.failed),
        ("EmitRetries".into(), counts.emit_retries),
        ("MarkFailures".into(), counts.mark_failures),
        ("Orphaned".into(), counts.orphaned),
        ("RecordsSkipped".into(), counts.skipped),
        ("EntriesEvicted".into(), counts.evicted),
        ("OutputsLost".into(), counts.outputs_lost),
        ("StateRebuilds".into(), counts.rebuilds),
        ("EntriesSpilledEarly".into(), counts.spilled_early),
    ];
    for (reason, n) in &counts.rejected {
        values.push((format!("Rejected.{}", reason.as_str()), *n));
    }
    emf_values(namespace, function, &values, timestamp_ms, invocation)
}

/// An EMF JSON line with the given named counts, plus `ColdStart` (1 on the first invocation
/// of an execution environment) and the `RequestId` property.
pub fn emf_values(
    namespace: &str,
    function: &str,
    values: &[(String, u64)],
    timestamp_ms: i64,
    invocation: &Invocation,
) -> String {
    let mut root = Map::new();
    let cold = [("ColdStart".to_owned(), u64::from(invocation.cold_start))];
    let values: Vec<&(String, u64)> = values.iter().chain(cold.iter()).collect();
    let metrics: Vec<Value> = values
        .iter()
        .map(|(name, _)| json!({"Name": name, "Unit": "Count"}))
        .collect();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": namespace,
                "Dimensions": [["Function"]],
                "Metrics": metrics,
            }],
        }),
    );
    root.insert("Function".into(), json!(function));
    root.insert("RequestId".into(), json!(invocation.request_id));
    for (name, n) in values {
        root.insert(name.clone(), json!(n));
    }
    Value::Object(root).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emf_line_declares_every_value_it_carries() {
        let mut c = Counts {
            records_in: 5,
            joined: 2,
            ..Counts::default()
        };
        c.reject(RejectReason::InvalidJson);
        c.reject(RejectReason::InvalidJson);
        let inv = Invocation::new("req-1", true);
        let v: Value = serde_json::from_str(&emf_line("adpipe", "joiner", &c, 7, &inv)).unwrap();
        assert_eq!(v["_aws"]["Timestamp"], 7);
        assert_eq!(v["Function"], "joiner");
        assert_eq!(v["RecordsIn"], 5);
        assert_eq!(v["Rejected"], 2);
        assert_eq!(v["Rejected.invalid_json"], 2);
        assert_eq!(v["ColdStart"], 1);
        assert_eq!(v["RequestId"], "req-1");
        let declared = v["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap();
        for m in declared {
            let name = m["Name"].as_str().unwrap();
            assert!(v[name].is_u64(), "{name} declared but not set");
        }
    }

    #[test]
    fn adding_counts_sums_every_field_and_each_reject_reason() {
        let mut one = Counts {
            records_in: 3,
            joined: 1,
            evicted: 2,
            ..Counts::default()
        };
        one.reject(RejectReason::InvalidJson);
        let mut total = Counts::default();
        total += &one;
        total += &one;
        let mut expected = Counts {
            records_in: 6,
            joined: 2,
            evicted: 4,
            ..Counts::default()
        };
        expected.reject(RejectReason::InvalidJson);
        expected.reject(RejectReason::InvalidJson);
        assert_eq!(total, expected);
    }

    #[test]
    fn only_the_first_invocation_is_cold_and_every_line_names_its_request() {
        let cold = ColdStart::new();
        assert!(cold.take());
        assert!(!cold.take());
        assert!(!cold.take());
        let warm = Invocation::new("req-2", false);
        let v: Value =
            serde_json::from_str(&emf_line("adpipe", "joiner", &Counts::default(), 7, &warm))
                .unwrap();
        assert_eq!(v["ColdStart"], 0);
        assert_eq!(v["RequestId"], "req-2");
        let names: Vec<&str> = v["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"ColdStart"));
        assert!(!names.contains(&"RequestId"), "a property, not a metric");
        let dims = &v["_aws"]["CloudWatchMetrics"][0]["Dimensions"];
        assert_eq!(
            dims,
            &serde_json::json!([["Function"]]),
            "no per-request dimension"
        );
    }
}
