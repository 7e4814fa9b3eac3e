//! Shared helpers for the benchmark binaries (each parses its options with clap): statistics over rounds, real-shaped
//! joined-stream records, the enricher's CPU path, and process memory readings.

pub mod proxy;
pub mod runtime_api;
pub mod soak;

use adpipe_core::enrich::{enrich_click, enrich_impression, EnrichRules};
use adpipe_core::enricher::decode_joined;
use adpipe_core::lake::{clicks_batch, impressions_batch};
use adpipe_core::model::{Click, Impression, ImpressionRecord, JoinedRecord, JoinedStreamRecord};
use arrow_array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

/// Median, minimum and maximum of a few rounds. The machines are shared and noisy, so a
/// figure is the median with its range, never one round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `samples` (at least one).
    pub fn of(mut samples: Vec<f64>) -> Spread {
        samples.sort_by(|a, b| a.total_cmp(b));
        let n = samples.len();
        let median = if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Spread {
            median,
            min: samples[0],
            max: samples[n - 1],
        }
    }
}

impl Spread {
    /// `median (min–max)` with `decimals` digits after the point.
    pub fn with_decimals(&self, decimals: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.with_decimals(0))
    }
}

/// `n` real-shaped joined-stream records (20 campaigns, 5 device types), a share
/// `click_share` of them attributed clicks, the rest forwarded impressions.
pub fn joined_records(n: usize, click_share: f64) -> Vec<Vec<u8>> {
    let base = 1_795_169_730_000i64;
    (0..n)
        .map(|i| {
            let imp = Impression {
                ad_id: format!("ad-{}", i % 50),
                impression_id: format!("imp-{i:08}-0b6f2a58-93c1-4b8e-a7c2"),
                campaign_id: format!("camp-{}", i % 20),
                publisher_id: format!("pub-{}", i % 100),
                event_time_ms: base + (i as i64) * 37,
                device_type: ["mobile", "tablet", "desktop", "ios", "tv"][i % 5].into(),
                geo_location: "US-CA".into(),
                platform: "android".into(),
                ad_type: "banner".into(),
                bid_price: (i % 10_000) as f64 / 100.0,
            };
            let is_click = (i as f64 * click_share).fract() + click_share >= 1.0;
            let record = if is_click {
                let click = Click {
                    ad_id: imp.ad_id.clone(),
                    impression_id: imp.impression_id.clone(),
                    campaign_id: imp.campaign_id.clone(),
                    publisher_id: imp.publisher_id.clone(),
                    event_time_ms: imp.event_time_ms + 4_321,
                    device_type: "mobile".into(),
                    geo_location: "US-CA".into(),
                    platform: "android".into(),
                    click_price: 0.35,
                    click_id: format!("clk-{i:08}-5d1e"),
                    click_id_derived: false,
                };
                JoinedStreamRecord::Click(JoinedRecord::new(&imp, &click))
            } else {
                JoinedStreamRecord::Impression(ImpressionRecord::new(&imp, false))
            };
            serde_json::to_vec(&record).expect("serialisable")
        })
        .collect()
}

/// Decodes, validates and enriches joined-stream records into the clicks and impressions
/// Arrow batches, as the enricher does before it writes.
pub fn enriched_batches(data: &[Vec<u8>]) -> anyhow::Result<(RecordBatch, RecordBatch)> {
    let rules = EnrichRules::default();
    let (mut clicks, mut imps) = (Vec::new(), Vec::new());
    for d in data {
        for record in decode_joined(d).map_err(|r| anyhow::anyhow!("{r:?}"))? {
            match record {
                JoinedStreamRecord::Click(c) => {
                    clicks.push(enrich_click(&rules, c, 0).map_err(|r| anyhow::anyhow!("{r:?}"))?)
                }
                JoinedStreamRecord::Impression(i) => imps
                    .push(enrich_impression(&rules, i, 0).map_err(|r| anyhow::anyhow!("{r:?}"))?),
            }
        }
    }
    Ok((clicks_batch(&clicks)?, impressions_batch(&imps)?))
}

/// One Arrow batch as one Parquet file in memory.
pub fn encode_parquet(batch: &RecordBatch, props: &WriterProperties) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, batch.schema(), Some(props.clone()))?;
    w.write(batch)?;
    w.close()?;
    Ok(out)
}

/// This process's peak resident set (`getrusage`), in MiB.
pub fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

/// A `/proc/<pid>/status` memory field (`VmRSS`, `VmHWM`, …) of a live process, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field_kib(&status, field)
}

/// A memory field of one `/proc/<pid>/status` text, in KiB.
pub fn status_field_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_the_median_and_range_of_the_rounds() {
        let s = Spread::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(vec![4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(s.with_decimals(1), "2.0 (1.0–3.0)");
        assert_eq!(s.to_string(), "2 (1–3)");
    }

    #[test]
    fn status_fields_of_this_process_are_read() {
        assert!(proc_status_kib(std::process::id(), "VmRSS").unwrap() > 0);
        // Both fields from one reading: the kernel reports the peak as at least the RSS of that
        // same moment, but an RSS read earlier can exceed a peak read later (RSS is summed from
        // per-thread counters that other test threads update in between; this failed now and
        // then when read twice).
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let rss = status_field_kib(&status, "VmRSS").unwrap();
        let hwm = status_field_kib(&status, "VmHWM").unwrap();
        assert!(rss > 0 && hwm >= rss, "VmRSS {rss} kB, VmHWM {hwm} kB");
    }

    #[test]
    fn click_share_sets_the_mix_of_joined_records() {
        let data = joined_records(100, 0.25);
        let (clicks, imps) = enriched_batches(&data).unwrap();
        assert_eq!(clicks.num_rows(), 25);
        assert_eq!(imps.num_rows(), 75);
    }
}
