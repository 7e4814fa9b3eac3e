//! Seeded synthetic traffic: impressions and clicks as producers would send them, with the
//! knobs that exercise the pipeline (CTR, click delays inside, slightly before and beyond the
//! join window, out-of-order and duplicate deliveries, malformed records, premium and
//! non-premium bids). Pure: the same configuration gives the same bytes.

use std::f64::consts::TAU;

use adpipe_core::model::{Click, Impression};
use adpipe_core::rng::Rng;
use adpipe_core::validate::{
    derive_click_id, encode_click as click_json, encode_impression as impression_json,
};
use serde_json::json;

/// How click delays (click time − impression time) are distributed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DelayMix {
    /// Share of clicks within the window after the impression (0..=30 s, mostly a few seconds).
    pub inside: f64,
    /// Share of clicks slightly *before* their impression (producer clock skew, up to 2 s):
    /// still inside the window, so they join.
    pub before: f64,
    /// Share of clicks after the window (30.001..=120 s): they must not join.
    pub beyond: f64,
}

impl Default for DelayMix {
    fn default() -> Self {
        DelayMix {
            inside: 0.93,
            before: 0.04,
            beyond: 0.03,
        }
    }
}

/// The generator's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficConfig {
    pub seed: u64,
    pub impressions: usize,
    /// Event time of the first possible impression (UTC epoch ms).
    pub start_ms: i64,
    /// Impression event times are spread over this many milliseconds.
    pub duration_ms: i64,
    pub campaigns: usize,
    pub ads: usize,
    pub publishers: usize,
    /// Mean probability that an impression is clicked (per campaign it varies from 0.5× to
    /// 1.5×, and over time by ±30 %, so CTR charts have something to show).
    pub ctr: f64,
    /// Share of clicked impressions clicked a second time.
    pub second_click: f64,
    pub delays: DelayMix,
    /// Share of clicks that carry no `click_id` (the joiner derives one).
    pub derived_click_ids: f64,
    /// Share of deliveries that arrive late, up to `reorder_distance` positions after their turn.
    pub out_of_order: f64,
    pub reorder_distance: usize,
    /// Share of deliveries sent twice (the copy arrives a little later).
    pub duplicates: f64,
    /// Malformed records added, as a share of the valid deliveries of each stream.
    pub malformed: f64,
    /// Prefix of every id, so runs with different seeds never share ids.
    pub id_prefix: String,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        TrafficConfig {
            seed: 42,
            impressions: 10_000,
            start_ms: 1_795_168_800_000, // 2026-11-20T10:00:00Z
            duration_ms: 15 * 60_000,
            campaigns: 5,
            ads: 40,
            publishers: 20,
            ctr: 0.03,
            second_click: 0.05,
            delays: DelayMix::default(),
            derived_click_ids: 0.2,
            out_of_order: 0.05,
            reorder_distance: 200,
            duplicates: 0.01,
            malformed: 0.002,
            id_prefix: String::new(),
        }
    }
}

/// A configuration the generator refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("traffic setting {name} = {value} is not valid: {why}")]
pub struct InvalidTraffic {
    pub name: &'static str,
    pub value: String,
    pub why: &'static str,
}

impl TrafficConfig {
    pub fn validate(&self) -> Result<(), InvalidTraffic> {
        let share = |name: &'static str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(InvalidTraffic {
                    name,
                    value: v.to_string(),
                    why: "expected a share between 0 and 1",
                })
            }
        };
        share("ctr", self.ctr)?;
        share("second_click", self.second_click)?;
        share("derived_click_ids", self.derived_click_ids)?;
        share("out_of_order", self.out_of_order)?;
        share("duplicates", self.duplicates)?;
        share("malformed", self.malformed)?;
        let d = self.delays;
        for (name, v) in [
            ("delay inside", d.inside),
            ("delay before", d.before),
            ("delay beyond", d.beyond),
        ] {
            share(name, v)?;
        }
        if d.inside + d.before + d.beyond <= 0.0 {
            return Err(InvalidTraffic {
                name: "delays",
                value: format!("{d:?}"),
                why: "at least one delay class needs a positive share",
            });
        }
        for (name, v) in [
            ("campaigns", self.campaigns),
            ("ads", self.ads),
            ("publishers", self.publishers),
        ] {
            if v == 0 {
                return Err(InvalidTraffic {
                    name,
                    value: "0".into(),
                    why: "expected at least 1",
                });
            }
        }
        if self.duration_ms <= 0 {
            return Err(InvalidTraffic {
                name: "duration_ms",
                value: self.duration_ms.to_string(),
                why: "expected a positive duration",
            });
        }
        Ok(())
    }
}

/// What was generated: the distinct events (ground truth) and the raw deliveries per stream.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    pub impressions: Vec<Impression>,
    pub clicks: Vec<Click>,
    /// The impressions stream's records in delivery order (duplicates and malformed included).
    pub impression_records: Vec<Vec<u8>>,
    /// The clicks stream's records in delivery order.
    pub click_records: Vec<Vec<u8>>,
    pub stats: TrafficStats,
}

/// Counts of what the generator put in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficStats {
    pub clicks_inside: u64,
    pub clicks_before: u64,
    pub clicks_beyond: u64,
    pub derived_click_ids: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub malformed: u64,
    pub premium_bids: u64,
}

const DEVICES: [(&str, u32); 10] = [
    ("mobile", 30),
    ("ios", 10),
    ("android", 10),
    ("Tablet", 10),
    ("iPad", 5),
    (" desktop ", 15),
    ("PC", 5),
    ("laptop", 5),
    ("smart-tv", 5),
    ("console", 5),
];
const GEOS: [(&str, u32); 8] = [
    ("US-CA", 25),
    ("US-NY", 20),
    ("GB", 12),
    ("DE", 12),
    ("FR", 8),
    ("JP", 8),
    ("BR", 8),
    ("IN", 7),
];
const AD_TYPES: [(&str, u32); 4] = [
    ("banner", 50),
    ("video", 20),
    ("native", 20),
    ("interstitial", 10),
];

fn platform_of(device: &str) -> &'static str {
    match device.trim().to_ascii_lowercase().as_str() {
        "ios" | "ipad" => "ios",
        "android" | "mobile" | "tablet" => "android",
        _ => "web",
    }
}

/// The kinds of malformed records, each a different dead-letter reason.
fn malformed_record(rng: &mut Rng, n: u64, valid_example: &[u8]) -> Vec<u8> {
    let mut obj: serde_json::Value =
        serde_json::from_slice(valid_example).unwrap_or_else(|_| json!({}));
    match n % 11 {
        0 => b"this is not json".to_vec(),
        1 => vec![0xff, 0xfe, b'{', 0xfd],
        2 => b"[1,2,3]".to_vec(),
        3 => {
            // Truncated mid-document, as a producer crash would leave it.
            let cut = valid_example.len() / 2;
            valid_example[..cut].to_vec()
        }
        4 => {
            if let Some(m) = obj.as_object_mut() {
                m.remove("campaign_id");
            }
            obj.to_string().into_bytes()
        }
        5 => {
            obj["ad_id"] = serde_json::Value::Null;
            obj.to_string().into_bytes()
        }
        6 => {
            obj["impression_id"] = json!("");
            obj.to_string().into_bytes()
        }
        7 => {
            obj["event_time"] = json!(format!("2026-02-3{}T10:00:00Z", rng.below(2)));
            obj.to_string().into_bytes()
        }
        8 => {
            obj["publisher_id"] = json!(12345);
            obj.to_string().into_bytes()
        }
        9 => {
            // "" is a missing value (empty_field), not an unknown device.
            obj["device_type"] = json!("");
            obj.to_string().into_bytes()
        }
        _ => {
            let price = if obj.get("bid_price").is_some() {
                "bid_price"
            } else {
                "click_price"
            };
            obj[price] = json!(-1.5);
            obj.to_string().into_bytes()
        }
    }
}

/// Delivery order: records are sent in event-time order, except that a share arrives late
/// (displaced by up to `distance` positions) and a share is delivered twice.
fn deliveries(
    rng: &mut Rng,
    records: Vec<Vec<u8>>,
    cfg: &TrafficConfig,
    stats: &mut TrafficStats,
) -> Vec<Vec<u8>> {
    let distance = cfg.reorder_distance.max(1) as u64;
    let mut keyed: Vec<(f64, Vec<u8>)> = Vec::with_capacity(records.len());
    for (i, r) in records.into_iter().enumerate() {
        let mut key = i as f64;
        if rng.chance(cfg.out_of_order) {
            key += (1 + rng.below(distance)) as f64 + 0.5;
            stats.out_of_order += 1;
        }
        if rng.chance(cfg.duplicates) {
            keyed.push((key + (1 + rng.below(distance)) as f64 + 0.25, r.clone()));
            stats.duplicates += 1;
        }
        keyed.push((key, r));
    }
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
    keyed.into_iter().map(|(_, r)| r).collect()
}

fn add_malformed(rng: &mut Rng, records: &mut Vec<Vec<u8>>, share: f64, stats: &mut TrafficStats) {
    let Some(example) = records.first().cloned() else {
        return;
    };
    let n = (records.len() as f64 * share).round() as u64;
    for k in 0..n {
        let at = rng.below(records.len() as u64 + 1) as usize;
        records.insert(at, malformed_record(rng, k, &example));
        stats.malformed += 1;
    }
}

/// Generates the traffic described by `cfg`.
pub fn generate(cfg: &TrafficConfig) -> Result<Traffic, InvalidTraffic> {
    cfg.validate()?;
    let mut rng = Rng::new(cfg.seed);
    let mut stats = TrafficStats::default();
    let p = &cfg.id_prefix;
    // Per-campaign CTR factor and phase, so campaigns differ and vary over time.
    let campaign_shape: Vec<(f64, f64)> = (0..cfg.campaigns)
        .map(|_| (0.5 + rng.unit(), rng.unit() * TAU))
        .collect();

    let mut impressions = Vec::with_capacity(cfg.impressions);
    let mut clicks = Vec::new();
    let step = cfg.duration_ms as f64 / cfg.impressions.max(1) as f64;
    for n in 0..cfg.impressions {
        let ad = rng.below(cfg.ads as u64) as usize;
        let campaign = ad % cfg.campaigns;
        // Evenly spread with jitter, so every minute of the span has traffic.
        let offset = (n as f64 * step + rng.unit() * step) as i64;
        let device = *rng.pick(&DEVICES);
        // Cents from 0.10 to 100.00: about half above the premium threshold, and the
        // threshold itself (50.00, not premium) now and then.
        let cents = if rng.chance(0.01) {
            5_000
        } else {
            rng.between(10, 10_000)
        };
        if cents > 5_000 {
            stats.premium_bids += 1;
        }
        let imp = Impression {
            ad_id: format!("{p}ad-{ad:03}"),
            impression_id: format!("{p}imp-{:x}-{n:07}", cfg.seed),
            campaign_id: format!("{p}camp-{campaign:02}"),
            publisher_id: format!("{p}pub-{:03}", rng.below(cfg.publishers as u64)),
            event_time_ms: cfg.start_ms + offset.min(cfg.duration_ms - 1),
            device_type: device.to_owned(),
            geo_location: (*rng.pick(&GEOS)).to_owned(),
            platform: platform_of(device).to_owned(),
            ad_type: (*rng.pick(&AD_TYPES)).to_owned(),
            bid_price: cents as f64 / 100.0,
        };
        let (factor, phase) = campaign_shape[campaign];
        let t = offset as f64 / cfg.duration_ms as f64;
        let p_click = (cfg.ctr * factor * (1.0 + 0.3 * (TAU * t + phase).sin())).clamp(0.0, 1.0);
        if rng.chance(p_click) {
            let count = if rng.chance(cfg.second_click) { 2 } else { 1 };
            for _ in 0..count {
                clicks.push(click_for(&mut rng, cfg, &imp, clicks.len(), &mut stats));
            }
        }
        impressions.push(imp);
    }

    let mut impression_records = deliveries(
        &mut rng,
        impressions.iter().map(impression_json).collect(),
        cfg,
        &mut stats,
    );
    // Clicks are produced in click-time order, which is not their impressions' order.
    let mut by_time: Vec<&Click> = clicks.iter().collect();
    by_time.sort_by_key(|c| c.event_time_ms);
    let mut click_records = deliveries(
        &mut rng,
        by_time.into_iter().map(click_json).collect(),
        cfg,
        &mut stats,
    );
    add_malformed(&mut rng, &mut impression_records, cfg.malformed, &mut stats);
    add_malformed(&mut rng, &mut click_records, cfg.malformed, &mut stats);
    Ok(Traffic {
        impressions,
        clicks,
        impression_records,
        click_records,
        stats,
    })
}

fn click_for(
    rng: &mut Rng,
    cfg: &TrafficConfig,
    imp: &Impression,
    n: usize,
    stats: &mut TrafficStats,
) -> Click {
    let d = cfg.delays;
    let total = d.inside + d.before + d.beyond;
    let x = rng.unit() * total;
    let delay = if x < d.inside {
        stats.clicks_inside += 1;
        // Mostly a few seconds (exponential, mean 4 s), never past the window.
        ((-(1.0 - rng.unit()).ln() * 4_000.0) as i64).min(30_000)
    } else if x < d.inside + d.before {
        stats.clicks_before += 1;
        -rng.between(1, 2_000)
    } else {
        stats.clicks_beyond += 1;
        rng.between(30_001, 120_000)
    };
    let device = if rng.chance(0.9) {
        imp.device_type.clone()
    } else {
        (*rng.pick(&DEVICES)).to_owned()
    };
    let mut click = Click {
        ad_id: imp.ad_id.clone(),
        impression_id: imp.impression_id.clone(),
        campaign_id: imp.campaign_id.clone(),
        publisher_id: imp.publisher_id.clone(),
        event_time_ms: imp.event_time_ms + delay,
        device_type: device,
        geo_location: imp.geo_location.clone(),
        platform: imp.platform.clone(),
        click_price: rng.between(5, 250) as f64 / 100.0,
        click_id: format!("{}clk-{:x}-{n:07}", cfg.id_prefix, cfg.seed),
        click_id_derived: false,
    };
    if rng.chance(cfg.derived_click_ids) {
        click.click_id = derive_click_id(&click);
        click.click_id_derived = true;
        stats.derived_click_ids += 1;
    }
    click
}

#[cfg(test)]
mod tests {
    use super::*;
    use adpipe_core::model::{Event, RecordKind};
    use adpipe_core::validate::decode;
    use std::collections::{BTreeMap, BTreeSet};

    fn small() -> TrafficConfig {
        TrafficConfig {
            impressions: 2_000,
            ctr: 0.2,
            malformed: 0.01,
            duplicates: 0.05,
            out_of_order: 0.1,
            ..TrafficConfig::default()
        }
    }

    fn decoded(kind: RecordKind, records: &[Vec<u8>]) -> (Vec<Event>, usize) {
        let mut ok = Vec::new();
        let mut bad = 0;
        for r in records {
            match decode(kind, r) {
                Ok(e) => ok.push(e),
                Err(_) => bad += 1,
            }
        }
        (ok, bad)
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes_and_another_seed_does_not() {
        let a = generate(&small()).unwrap();
        let b = generate(&small()).unwrap();
        assert_eq!(a.impression_records, b.impression_records);
        assert_eq!(a.click_records, b.click_records);
        let c = generate(&TrafficConfig { seed: 7, ..small() }).unwrap();
        assert_ne!(a.impression_records, c.impression_records);
    }

    #[test]
    fn deliveries_decode_to_exactly_the_generated_events_plus_duplicates_and_malformed() {
        let t = generate(&small()).unwrap();
        let (imps, bad_i) = decoded(RecordKind::Impression, &t.impression_records);
        let (clicks, bad_c) = decoded(RecordKind::Click, &t.click_records);
        assert_eq!((bad_i + bad_c) as u64, t.stats.malformed);
        assert!(bad_i > 0 && bad_c > 0);
        let distinct_imps: BTreeSet<String> =
            imps.iter().map(|e| e.impression_id().to_owned()).collect();
        let expected: BTreeSet<String> = t
            .impressions
            .iter()
            .map(|i| i.impression_id.clone())
            .collect();
        assert_eq!(distinct_imps, expected);
        // Decoding re-derives the same click ids the generator recorded.
        let mut decoded_clicks: BTreeMap<String, Click> = BTreeMap::new();
        for e in clicks {
            if let Event::Click(c) = e {
                decoded_clicks.insert(c.click_id.clone(), c);
            }
        }
        assert_eq!(decoded_clicks.len(), t.clicks.len());
        for c in &t.clicks {
            assert_eq!(decoded_clicks.get(&c.click_id), Some(c));
        }
        let deliveries = (t.impression_records.len() + t.click_records.len()) as u64;
        assert_eq!(
            deliveries,
            (t.impressions.len() + t.clicks.len()) as u64 + t.stats.duplicates + t.stats.malformed
        );
    }

    #[test]
    fn knobs_show_in_the_traffic() {
        let t = generate(&small()).unwrap();
        let s = t.stats;
        assert!(
            s.clicks_inside > 0 && s.clicks_before > 0 && s.clicks_beyond > 0,
            "{s:?}"
        );
        assert!(s.duplicates > 0 && s.out_of_order > 0 && s.derived_click_ids > 0);
        let premium = t.impressions.iter().filter(|i| i.bid_price > 50.0).count();
        assert!(
            premium > 0 && premium < t.impressions.len(),
            "both is_premium_ad values"
        );
        let campaigns: BTreeSet<&str> = t
            .impressions
            .iter()
            .map(|i| i.campaign_id.as_str())
            .collect();
        assert_eq!(campaigns.len(), 5);
        let ctr = t.clicks.len() as f64 / t.impressions.len() as f64;
        assert!((0.1..0.35).contains(&ctr), "ctr {ctr}");
        // Out of order: some click precedes, in delivery, a click with an earlier event time.
        let (clicks, _) = decoded(RecordKind::Click, &t.click_records);
        let times: Vec<i64> = clicks.iter().map(Event::event_time_ms).collect();
        assert!(times.windows(2).any(|w| w[0] > w[1]));
        // Every impression lies in the configured span.
        let cfg = small();
        assert!(t
            .impressions
            .iter()
            .all(|i| (cfg.start_ms..cfg.start_ms + cfg.duration_ms).contains(&i.event_time_ms)));
    }

    #[test]
    fn every_click_delay_class_lands_where_it_should() {
        let t = generate(&TrafficConfig {
            impressions: 3_000,
            ctr: 0.5,
            ..TrafficConfig::default()
        })
        .unwrap();
        let imps: BTreeMap<&str, &Impression> = t
            .impressions
            .iter()
            .map(|i| (i.impression_id.as_str(), i))
            .collect();
        let (mut before, mut beyond) = (0, 0);
        for c in &t.clicks {
            let delay = c.event_time_ms - imps[c.impression_id.as_str()].event_time_ms;
            assert!((-2_000..=120_000).contains(&delay), "{delay}");
            before += u64::from(delay < 0);
            beyond += u64::from(delay > 30_000);
        }
        assert_eq!(before, t.stats.clicks_before);
        assert_eq!(beyond, t.stats.clicks_beyond);
    }

    #[test]
    fn invalid_knobs_are_refused() {
        assert!(generate(&TrafficConfig {
            ctr: 1.5,
            ..TrafficConfig::default()
        })
        .is_err());
        assert!(generate(&TrafficConfig {
            campaigns: 0,
            ..TrafficConfig::default()
        })
        .is_err());
    }
}
