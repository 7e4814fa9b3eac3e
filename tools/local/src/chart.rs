//! The CTR-over-time chart: a self-contained HTML page with an inline SVG line chart (one line
//! per campaign, plus all campaigns together), built from the lake's impressions and clicks
//! per campaign and minute. No plotting dependency; any browser opens it offline.

use std::collections::BTreeMap;
use std::fmt::Write;

use chrono::NaiveDateTime;
use serde_json::Value;

use crate::lake::QueryResult;

/// Impressions and clicks of one campaign in one minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtrPoint {
    /// The minute, as UTC epoch milliseconds.
    pub minute_ms: i64,
    pub campaign: String,
    pub impressions: u64,
    pub clicks: u64,
}

/// The chart's data query (Athena and DuckDB both run it): impressions and attributed clicks
/// per campaign and minute of impression time.
pub const CHART_SQL: &str = "\
-- CTR over time for the local chart: impressions and attributed clicks per campaign and
-- minute of impression time (clicks count toward the minute of the impression they follow).
WITH shown AS (
  SELECT campaign_id, date_trunc('minute', impression_time) AS minute, count(*) AS impressions
  FROM impressions
  GROUP BY 1, 2
), clicked AS (
  SELECT campaign_id, date_trunc('minute', impression_time) AS minute, count(*) AS clicks
  FROM enriched_clicks
  GROUP BY 1, 2
)
SELECT s.minute, s.campaign_id, s.impressions, coalesce(c.clicks, 0) AS clicks
FROM shown s
LEFT JOIN clicked c ON c.campaign_id = s.campaign_id AND c.minute = s.minute
ORDER BY s.minute, s.campaign_id
";

/// Reads [`CHART_SQL`]'s result.
pub fn points(result: &QueryResult) -> Result<Vec<CtrPoint>, String> {
    let col = |name: &str| {
        result
            .columns
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| format!("the chart query has no column {name}"))
    };
    let (m, c, i, k) = (
        col("minute")?,
        col("campaign_id")?,
        col("impressions")?,
        col("clicks")?,
    );
    result
        .rows
        .iter()
        .map(|row| {
            let text = |j: usize| row.get(j).and_then(Value::as_str).unwrap_or_default();
            let number = |j: usize| row.get(j).and_then(Value::as_u64).unwrap_or_default();
            let minute = NaiveDateTime::parse_from_str(text(m), "%Y-%m-%dT%H:%M:%S")
                .map_err(|e| format!("minute {:?}: {e}", text(m)))?;
            Ok(CtrPoint {
                minute_ms: minute.and_utc().timestamp_millis(),
                campaign: text(c).to_owned(),
                impressions: number(i),
                clicks: number(k),
            })
        })
        .collect()
}

const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];
/// Campaigns drawn as their own line (the largest by impressions); all count in the total.
const MAX_LINES: usize = 10;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn hhmm(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%H:%M").to_string())
        .unwrap_or_default()
}

fn pct(clicks: u64, impressions: u64) -> f64 {
    if impressions == 0 {
        0.0
    } else {
        100.0 * clicks as f64 / impressions as f64
    }
}

/// The chart page. `subtitle` says where the data came from.
pub fn html(points: &[CtrPoint], title: &str, subtitle: &str) -> String {
    let mut minutes: Vec<i64> = points.iter().map(|p| p.minute_ms).collect();
    minutes.sort_unstable();
    minutes.dedup();
    // Per campaign: minute → (impressions, clicks); and the total per minute.
    let mut by_campaign: BTreeMap<&str, BTreeMap<i64, (u64, u64)>> = BTreeMap::new();
    let mut total: BTreeMap<i64, (u64, u64)> = BTreeMap::new();
    for p in points {
        let e = by_campaign
            .entry(&p.campaign)
            .or_default()
            .entry(p.minute_ms)
            .or_default();
        e.0 += p.impressions;
        e.1 += p.clicks;
        let t = total.entry(p.minute_ms).or_default();
        t.0 += p.impressions;
        t.1 += p.clicks;
    }
    let mut campaigns: Vec<(&str, u64, u64)> = by_campaign
        .iter()
        .map(|(c, m)| {
            (
                *c,
                m.values().map(|v| v.0).sum::<u64>(),
                m.values().map(|v| v.1).sum::<u64>(),
            )
        })
        .collect();
    // The largest campaigns get lines; shown in name order, so colours follow names.
    campaigns.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let lines = MAX_LINES.min(campaigns.len());
    let (head, tail) = campaigns.split_at_mut(lines);
    head.sort_by(|a, b| a.0.cmp(b.0));
    tail.sort_by(|a, b| a.0.cmp(b.0));

    let (w, h) = (960.0f64, 480.0f64);
    let (left, right, top, bottom) = (64.0, 190.0, 24.0, 48.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let max_ctr = by_campaign
        .values()
        .flat_map(|m| m.values())
        .chain(total.values())
        .map(|(i, c)| pct(*c, *i))
        .fold(0.0f64, f64::max);
    // A round upper bound for the y axis.
    let step = [0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 25.0]
        .into_iter()
        .find(|s| max_ctr / s <= 6.0)
        .unwrap_or(25.0);
    let y_max = ((max_ctr / step).ceil() * step).max(step);
    let (t0, t1) = (
        minutes.first().copied().unwrap_or(0),
        minutes.last().copied().unwrap_or(0),
    );
    let span = (t1 - t0).max(60_000) as f64;
    let x = |t: i64| left + pw * (t - t0) as f64 / span;
    let y = |v: f64| top + ph * (1.0 - v / y_max);

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        svg,
        r#"<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>"#
    );
    // Grid and y labels.
    let mut v = 0.0;
    while v <= y_max + 1e-9 {
        let yy = y(v);
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v}%</text>"##,
            left + pw,
            left - 6.0,
            yy + 4.0
        );
        v += step;
    }
    // x labels: about ten, on whole minutes.
    let every = (minutes.len() / 10).max(1);
    for (n, t) in minutes.iter().enumerate() {
        if n % every != 0 && n + 1 != minutes.len() {
            continue;
        }
        let xx = x(*t);
        let _ = write!(
            svg,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#999"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 4.0,
            top + ph + 18.0,
            hhmm(*t)
        );
    }
    let _ = write!(
        svg,
        r##"<line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="#333"/><line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/>"##,
        top + ph,
        top + ph,
        left + pw,
        top + ph
    );
    let _ = write!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">minute of impression time (UTC)</text><text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">CTR (clicks / impressions)</text>"#,
        left + pw / 2.0,
        h - 8.0,
        top + ph / 2.0
    );
    let mut line = |name: &str, series: &BTreeMap<i64, (u64, u64)>, colour: &str, width: f64| {
        let path: Vec<String> = series
            .iter()
            .map(|(t, (i, c))| format!("{:.1},{:.1}", x(*t), y(pct(*c, *i))))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="{width}" points="{}"><title>{}</title></polyline>"#,
            path.join(" "),
            escape(name)
        );
        for (t, (i, c)) in series {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{colour}"><title>{} {}: {:.2}% ({c}/{i})</title></circle>"#,
                x(*t),
                y(pct(*c, *i)),
                escape(name),
                hhmm(*t),
                pct(*c, *i)
            );
        }
    };
    for (n, (c, _, _)) in campaigns.iter().take(MAX_LINES).enumerate() {
        line(c, &by_campaign[c], PALETTE[n % PALETTE.len()], 1.5);
    }
    line("all campaigns", &total, "#000", 3.0);
    // Legend.
    let lx = left + pw + 16.0;
    let mut ly = top + 8.0;
    let entries: Vec<(String, &str)> = std::iter::once(("all campaigns".to_owned(), "#000"))
        .chain(
            campaigns
                .iter()
                .take(MAX_LINES)
                .enumerate()
                .map(|(n, (c, i, k))| {
                    (
                        format!("{c} ({:.2}%)", pct(*k, *i)),
                        PALETTE[n % PALETTE.len()],
                    )
                }),
        )
        .collect();
    for (label, colour) in entries {
        let _ = write!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            escape(&label)
        );
        ly += 18.0;
    }
    svg.push_str("</svg>");

    let all_i: u64 = campaigns.iter().map(|c| c.1).sum();
    let all_c: u64 = campaigns.iter().map(|c| c.2).sum();
    let mut rows = String::new();
    for (c, i, k) in &campaigns {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{i}</td><td>{k}</td><td>{:.2}%</td></tr>",
            escape(c),
            pct(*k, *i)
        );
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;margin-top:16px}} td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} td:first-child,th:first-child{{text-align:left}}</style>
</head><body>
<h2>{t}</h2>
<p>{s}</p>
{svg}
<table><tr><th>campaign</th><th>impressions</th><th>clicks</th><th>CTR</th></tr>{rows}<tr><th>all campaigns</th><th>{all_i}</th><th>{all_c}</th><th>{:.2}%</th></tr></table>
</body></html>
"#,
        pct(all_c, all_i),
        t = escape(title),
        s = escape(subtitle),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn result() -> QueryResult {
        QueryResult {
            name: "chart".into(),
            columns: vec![
                "minute".into(),
                "campaign_id".into(),
                "impressions".into(),
                "clicks".into(),
            ],
            rows: vec![
                vec![
                    json!("2026-11-20T10:00:00"),
                    json!("camp-00"),
                    json!(100),
                    json!(3),
                ],
                vec![
                    json!("2026-11-20T10:00:00"),
                    json!("camp-<1>"),
                    json!(50),
                    json!(0),
                ],
                vec![
                    json!("2026-11-20T10:01:00"),
                    json!("camp-00"),
                    json!(100),
                    json!(5),
                ],
            ],
        }
    }

    #[test]
    fn query_rows_become_points() {
        let p = points(&result()).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].minute_ms, 1_795_168_800_000);
        assert_eq!(p[2].clicks, 5);
        let mut missing = result();
        missing.columns[3] = "x".into();
        assert!(points(&missing).is_err());
    }

    #[test]
    fn the_page_has_one_line_per_campaign_plus_the_total_and_escapes_names() {
        let page = html(&points(&result()).unwrap(), "CTR", "local lake");
        assert_eq!(page.matches("<polyline").count(), 3);
        assert!(page.contains("camp-&lt;1&gt;"));
        assert!(!page.contains("camp-<1>"));
        // camp-00 over both minutes: 8 clicks / 200 impressions.
        assert!(page.contains("<td>camp-00</td><td>200</td><td>8</td><td>4.00%</td>"));
        assert!(page.contains("<th>all campaigns</th><th>250</th><th>8</th><th>3.20%</th>"));
        assert!(page.contains(">10:00<") && page.contains(">10:01<"));
        assert!(page.contains("camp-00 10:01: 5.00% (5/100)"));
    }
}
