//! Per-batch counters and their CloudWatch Embedded Metric Format (EMF) log line.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::validate::RejectReason;

/// What one batch did. Emitted once per batch, never per record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub records_in: u64,
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
}

impl Counts {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    pub fn reject(&mut self, reason: RejectReason) {
        *self.rejected.entry(reason).or_default() += 1;
    }
}

/// The EMF JSON line for a batch: namespace `namespace`, dimension `Function`.
pub fn emf_line(namespace: &str, function: &str, counts: &Counts, timestamp_ms: i64) -> String {
    let mut values: Vec<(String, u64)> = vec![
        ("RecordsIn".into(), counts.records_in),
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
    ];
    for (reason, n) in &counts.rejected {
        values.push((format!("Rejected.{}", reason.as_str()), *n));
    }
    emf_values(namespace, function, &values, timestamp_ms)
}

/// An EMF JSON line with the given named counts.
pub fn emf_values(
    namespace: &str,
    function: &str,
    values: &[(String, u64)],
    timestamp_ms: i64,
) -> String {
    let mut root = Map::new();
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
        let v: Value = serde_json::from_str(&emf_line("adpipe", "joiner", &c, 7)).unwrap();
        assert_eq!(v["_aws"]["Timestamp"], 7);
        assert_eq!(v["Function"], "joiner");
        assert_eq!(v["RecordsIn"], 5);
        assert_eq!(v["Rejected"], 2);
        assert_eq!(v["Rejected.invalid_json"], 2);
        let declared = v["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap();
        for m in declared {
            let name = m["Name"].as_str().unwrap();
            assert!(v[name].is_u64(), "{name} declared but not set");
        }
    }
}
