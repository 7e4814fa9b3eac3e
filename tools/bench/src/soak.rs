//! The pure parts of `lake-soak` (see BENCHMARKS.md, "Lake soak: commit cost as the table
//! ages"): the seeded generator (adpipe-core's), the Zipf-like campaign sampler, strict option
//! parsing, per-window statistics, the CSV table, the chart and the summary line.

use std::fmt::Write;

/// The seeded generator (SplitMix64), so a run is reproducible from `--seed`.
pub use adpipe_core::rng::Rng;

/// Zipf-like popularity over `n` items: item `k` (0-based) has weight `1 / (k + 1)^s`.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// `n` ≥ 1 items, exponent `s` ≥ 0 (0 is uniform).
    pub fn new(n: usize, s: f64) -> Zipf {
        let weights: Vec<f64> = (1..=n.max(1)).map(|k| (k as f64).powf(-s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Zipf { cdf }
    }

    pub fn len(&self) -> usize {
        self.cdf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cdf.is_empty()
    }

    /// The probability of item `k`.
    pub fn probability(&self, k: usize) -> f64 {
        self.cdf[k] - if k == 0 { 0.0 } else { self.cdf[k - 1] }
    }

    /// The item for a uniform draw `u` in `[0, 1)`.
    pub fn item(&self, u: f64) -> usize {
        self.cdf
            .partition_point(|c| *c <= u)
            .min(self.cdf.len() - 1)
    }

    pub fn sample(&self, rng: &mut Rng) -> usize {
        self.item(rng.unit())
    }
}

/// The `q`-quantile (0 < q ≤ 1) by the nearest-rank method: the smallest sample with at least
/// `q` of the samples at or below it. `None` for no samples.
pub fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = (q * s.len() as f64).ceil().max(1.0) as usize;
    Some(s[rank.min(s.len()) - 1])
}

/// Requests and bytes (sent plus received) of one service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub requests: u64,
    pub bytes: u64,
}

/// One window of `W` commits (the last one may be shorter).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub index: usize,
    /// Commits in the run up to the end of this window.
    pub commits_end: u64,
    /// Append latencies (ms) of this window's commits.
    pub latencies_ms: Vec<f64>,
    /// Data files of each committed impressions / clicks append.
    pub files_impressions: Vec<u64>,
    pub files_clicks: Vec<u64>,
    /// Appends of this window that ran the duplicate-key check, and the bytes of data files in
    /// the snapshot each scanned (largest kept).
    pub key_checks: u64,
    pub key_check_bytes_max: u64,
    /// Bytes of data files read from S3 in the window (only the key check reads data files).
    pub data_file_get_bytes: u64,
    /// Bytes of manifests, manifest lists and `metadata.json` files read from S3 in the window.
    pub manifest_get_bytes: u64,
    pub manifest_list_get_bytes: u64,
    pub metadata_json_get_bytes: u64,
    pub rows_dropped: u64,
    pub s3: Traffic,
    pub glue: Traffic,
    pub dynamodb: Traffic,
    /// In the tables' current metadata at the end of the window: `[impressions, clicks]`.
    pub manifests: [u64; 2],
    pub snapshots: [u64; 2],
    pub metadata_bytes: [u64; 2],
    /// Wall seconds the window took: with every shard busy, commits per second is the
    /// tables' commit throughput, set by the time one commit holds a table's lease.
    pub seconds: f64,
}

fn max_mean(v: &[u64]) -> (u64, f64) {
    let max = v.iter().copied().max().unwrap_or(0);
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<u64>() as f64 / v.len() as f64
    };
    (max, mean)
}

impl Window {
    pub fn commits(&self) -> u64 {
        self.latencies_ms.len() as u64
    }

    pub fn p50_ms(&self) -> f64 {
        percentile(&self.latencies_ms, 0.5).unwrap_or(0.0)
    }

    pub fn p99_ms(&self) -> f64 {
        percentile(&self.latencies_ms, 0.99).unwrap_or(0.0)
    }

    fn per_commit(&self, n: u64) -> f64 {
        n as f64 / self.commits().max(1) as f64
    }

    pub fn files_per_batch_max(&self) -> u64 {
        max_mean(&self.files_impressions)
            .0
            .max(max_mean(&self.files_clicks).0)
    }

    pub const CSV_HEADER: &'static str = "window,commits_end,commits,p50_ms,p99_ms,max_ms,\
s3_requests_per_commit,s3_bytes_per_commit,glue_requests_per_commit,glue_bytes_per_commit,\
dynamodb_requests_per_commit,manifests_impressions,manifests_clicks,snapshots_impressions,\
snapshots_clicks,metadata_bytes_impressions,metadata_bytes_clicks,files_per_batch_max_impressions,\
files_per_batch_mean_impressions,files_per_batch_max_clicks,files_per_batch_mean_clicks,\
key_checks,key_check_bytes_max,data_file_get_bytes,rows_dropped,commits_per_s,\
manifest_get_bytes_per_commit,manifest_list_get_bytes_per_commit,metadata_json_get_bytes_per_commit";

    pub fn csv_row(&self) -> String {
        let (fi_max, fi_mean) = max_mean(&self.files_impressions);
        let (fc_max, fc_mean) = max_mean(&self.files_clicks);
        let max = percentile(&self.latencies_ms, 1.0).unwrap_or(0.0);
        format!(
            "{},{},{},{:.0},{:.0},{:.0},{:.1},{:.0},{:.1},{:.0},{:.1},{},{},{},{},{},{},{},{:.1},{},{:.1},{},{},{},{},{:.2},{:.0},{:.0},{:.0}",
            self.index,
            self.commits_end,
            self.commits(),
            self.p50_ms(),
            self.p99_ms(),
            max,
            self.per_commit(self.s3.requests),
            self.per_commit(self.s3.bytes),
            self.per_commit(self.glue.requests),
            self.per_commit(self.glue.bytes),
            self.per_commit(self.dynamodb.requests),
            self.manifests[0],
            self.manifests[1],
            self.snapshots[0],
            self.snapshots[1],
            self.metadata_bytes[0],
            self.metadata_bytes[1],
            fi_max,
            fi_mean,
            fc_max,
            fc_mean,
            self.key_checks,
            self.key_check_bytes_max,
            self.data_file_get_bytes,
            self.rows_dropped,
            if self.seconds > 0.0 { self.commits() as f64 / self.seconds } else { 0.0 },
            self.per_commit(self.manifest_get_bytes),
            self.per_commit(self.manifest_list_get_bytes),
            self.per_commit(self.metadata_json_get_bytes),
        )
    }
}

/// The last line of `lake-soak`'s output; its format is stable (later runs are compared with it).
/// `metadata_bytes_last` and `manifests_last` are the larger of the two tables in the last window;
/// `key_check_bytes_max` is over the whole run: the windows and `later_key_check_bytes_max`, the
/// key checks that ended after the last reported window (a key-check append can outlast many).
pub fn summary_line(commits: u64, windows: &[Window], later_key_check_bytes_max: u64) -> String {
    let first = windows.first();
    let last = windows.last();
    let p99 = |w: Option<&Window>| w.map(|w| w.p99_ms().round() as u64).unwrap_or(0);
    let files = windows
        .iter()
        .map(Window::files_per_batch_max)
        .max()
        .unwrap_or(0);
    let key = windows
        .iter()
        .map(|w| w.key_check_bytes_max)
        .max()
        .unwrap_or(0)
        .max(later_key_check_bytes_max);
    format!(
        "lake-soak: commits={commits} p99_ms_first={} p99_ms_last={} metadata_bytes_last={} manifests_last={} files_per_batch_max={files} key_check_bytes_max={key}",
        p99(first),
        p99(last),
        last.map(|w| w.metadata_bytes[0].max(w.metadata_bytes[1])).unwrap_or(0),
        last.map(|w| w.manifests[0].max(w.manifests[1])).unwrap_or(0),
    )
}

/// The chart: two panels sharing the x axis (commits so far), commit latency p50/p99 above and
/// `metadata.json` size of both tables below, as a self-contained SVG.
pub fn chart_svg(title: &str, windows: &[Window]) -> String {
    let (w, h, left, right, top, gap, panel) = (900.0, 640.0, 80.0, 30.0, 50.0, 70.0, 230.0);
    let x_max = windows
        .iter()
        .map(|w| w.commits_end)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |c: u64| left + (c as f64 / x_max) * (w - left - right);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{w}" height="{h}" fill="white"/><text x="{left}" y="24" font-size="15">{}</text>"#,
        escape(title)
    );
    type Series<'a> = (&'a str, &'a str, Box<dyn Fn(&Window) -> f64 + 'a>);
    let panels: [(&str, f64, Vec<Series>); 2] = [
        (
            "append (commit) latency, ms",
            top,
            vec![
                ("p99", "#d62728", Box::new(|w: &Window| w.p99_ms())),
                ("p50", "#1f77b4", Box::new(|w: &Window| w.p50_ms())),
            ],
        ),
        (
            "metadata.json, KB",
            top + panel + gap,
            vec![
                (
                    "impressions",
                    "#2ca02c",
                    Box::new(|w: &Window| w.metadata_bytes[0] as f64 / 1000.0),
                ),
                (
                    "clicks",
                    "#9467bd",
                    Box::new(|w: &Window| w.metadata_bytes[1] as f64 / 1000.0),
                ),
            ],
        ),
    ];
    for (label, y0, series) in &panels {
        let y_max = series
            .iter()
            .flat_map(|(_, _, f)| windows.iter().map(f))
            .fold(0.0f64, f64::max)
            .max(1.0)
            * 1.05;
        let y = |v: f64| y0 + panel - (v / y_max) * panel;
        let _ = writeln!(
            svg,
            r##"<rect x="{left}" y="{y0}" width="{}" height="{panel}" fill="none" stroke="#888"/>"##,
            w - left - right
        );
        let _ = writeln!(
            svg,
            r#"<text x="{left}" y="{}" font-weight="bold">{label}</text>"#,
            y0 - 6.0
        );
        for i in 0..=4 {
            let v = y_max * i as f64 / 4.0;
            let _ = writeln!(
                svg,
                r##"<text x="{}" y="{:.1}" text-anchor="end">{v:.0}</text><line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
                left - 6.0,
                y(v) + 4.0,
                w - right,
                y(v),
                y(v)
            );
        }
        for (n, (name, colour, f)) in series.iter().enumerate() {
            let points: Vec<String> = windows
                .iter()
                .map(|win| format!("{:.1},{:.1}", x(win.commits_end), y(f(win))))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" fill="{colour}">{name}</text>"#,
                w - right - 90.0,
                y0 + 16.0 + 14.0 * n as f64
            );
        }
        for i in 0..=5 {
            let c = (x_max * i as f64 / 5.0).round() as u64;
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{c}</text>"#,
                x(c),
                y0 + panel + 16.0
            );
        }
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">commits so far (both tables)</text></svg>"#,
        left + (w - left - right) / 2.0,
        h - 8.0
    );
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_weights_fall_as_a_power_of_rank_and_sampling_follows_them() {
        let z = Zipf::new(100, 1.0);
        let total: f64 = (0..100).map(|k| z.probability(k)).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!((z.probability(0) / z.probability(1) - 2.0).abs() < 1e-9);
        assert!((z.probability(0) / z.probability(9) - 10.0).abs() < 1e-9);
        assert_eq!(z.item(0.0), 0);
        assert_eq!(z.item(0.999_999_999), 99);
        let mut rng = Rng::new(7);
        let mut counts = vec![0u32; 100];
        for _ in 0..100_000 {
            counts[z.sample(&mut rng)] += 1;
        }
        let share = counts[0] as f64 / 100_000.0;
        assert!((share - z.probability(0)).abs() < 0.01, "{share}");
        assert!(counts[0] > counts[1] && counts[1] > counts[50]);
        // s = 0: uniform.
        let u = Zipf::new(4, 0.0);
        assert!((u.probability(3) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(percentile(&[5.0], 0.99), Some(5.0));
        assert_eq!(percentile(&[], 0.5), None);
        // Ten samples: p99 is the largest.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&ten, 0.99), Some(10.0));
    }

    fn window(index: usize, commits_end: u64, latencies: &[f64]) -> Window {
        Window {
            index,
            commits_end,
            latencies_ms: latencies.to_vec(),
            ..Window::default()
        }
    }

    #[test]
    fn window_statistics_and_the_summary_line() {
        let mut first = window(0, 4, &[10.0, 20.0, 30.0, 400.0]);
        first.files_impressions = vec![3, 5];
        first.files_clicks = vec![1, 9];
        first.key_check_bytes_max = 1234;
        first.metadata_bytes = [100, 90];
        first.manifests = [2, 2];
        first.s3 = Traffic {
            requests: 40,
            bytes: 4000,
        };
        let mut last = window(1, 8, &[50.0, 60.0, 70.0, 80.4]);
        last.files_impressions = vec![4];
        last.metadata_bytes = [300, 310];
        last.manifests = [4, 3];
        last.key_check_bytes_max = 99;
        assert_eq!(first.p50_ms(), 20.0);
        assert_eq!(first.p99_ms(), 400.0);
        assert_eq!(first.files_per_batch_max(), 9);
        assert_eq!(
            summary_line(8, &[first.clone(), last.clone()], 0),
            "lake-soak: commits=8 p99_ms_first=400 p99_ms_last=80 metadata_bytes_last=310 \
             manifests_last=4 files_per_batch_max=9 key_check_bytes_max=1234"
        );
        assert!(summary_line(8, &[first.clone(), last.clone()], 5000)
            .ends_with(" key_check_bytes_max=5000"));
        assert_eq!(
            summary_line(0, &[], 0),
            "lake-soak: commits=0 p99_ms_first=0 p99_ms_last=0 metadata_bytes_last=0 \
             manifests_last=0 files_per_batch_max=0 key_check_bytes_max=0"
        );
        let row = first.csv_row();
        assert_eq!(
            row.split(',').count(),
            Window::CSV_HEADER.split(',').count()
        );
        assert!(row.starts_with("0,4,4,20,400,400,10.0,1000,"), "{row}");
        let svg = chart_svg("t <1>", &[first, last]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;1&gt;"));
    }
}
