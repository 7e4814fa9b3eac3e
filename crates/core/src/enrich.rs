//! Enrichment rules (README.md, "Enricher configuration"; docs/DESIGN.md, "The lake"): one
//! enriched row per joined pair, and the impression rows of the lake's `impressions` table.

use crate::model::{ImpressionRecord, JoinedRecord};
use crate::time::parse_event_time;
use crate::validate::{RejectReason, Rejection};

/// The enrichment tunables.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EnrichRules {
    /// `is_premium_ad` is `Yes` when `bid_price` is strictly above this. Default 50.
    pub premium_bid_threshold: f64,
    /// `click_revenue = click_price × factor`. Default 1.2.
    pub click_revenue_factor: f64,
}

impl Default for EnrichRules {
    fn default() -> Self {
        EnrichRules {
            premium_bid_threshold: 50.0,
            click_revenue_factor: 1.2,
        }
    }
}

/// `'Yes'` if `bid_price > threshold` (strict), else `'No'`.
pub fn is_premium_ad(bid_price: f64, threshold: f64) -> &'static str {
    if bid_price > threshold {
        "Yes"
    } else {
        "No"
    }
}

/// `click_time − impression_time` in whole seconds, truncated toward zero, signed.
pub fn engagement_duration(impression_ms: i64, click_ms: i64) -> i64 {
    // Integer division in Rust truncates toward zero: -1_500 ms → -1 s.
    (click_ms - impression_ms) / 1000
}

/// The device family of an impression's `device_type`, trimmed and ASCII-case-insensitive.
/// Unknown devices are `Other`, never an error.
pub fn platform_category(device_type: &str) -> &'static str {
    let d = device_type.trim().to_ascii_lowercase();
    match d.as_str() {
        "mobile" | "phone" | "smartphone" | "android" | "ios" => "Mobile",
        "tablet" | "ipad" => "Tablet",
        "desktop" | "pc" | "laptop" | "mac" | "windows" | "linux" => "Desktop",
        _ => "Other",
    }
}

/// `click_price × factor`.
pub fn click_revenue(click_price: f64, factor: f64) -> f64 {
    click_price * factor
}

/// A row of the `enriched_clicks` table. Times are UTC epoch milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrichedClick {
    pub pair: JoinedRecord,
    pub impression_time_ms: i64,
    pub click_time_ms: i64,
    pub is_premium_ad: &'static str,
    pub engagement_duration: i64,
    pub platform_category: &'static str,
    pub click_revenue: f64,
    pub processed_time_ms: i64,
}

/// A row of the `impressions` table.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrichedImpression {
    pub impression: ImpressionRecord,
    pub impression_time_ms: i64,
    pub is_premium_ad: &'static str,
    pub platform_category: &'static str,
    pub processed_time_ms: i64,
}

fn time(field: &str, value: &str) -> Result<i64, Rejection> {
    parse_event_time(value).map_err(|e| {
        Rejection::new(
            RejectReason::InvalidTime,
            format!("joined record `{field}`: {e}"),
        )
    })
}

fn price(field: &str, p: f64) -> Result<f64, Rejection> {
    if !p.is_finite() {
        return Err(Rejection::new(
            RejectReason::NonFinitePrice,
            format!("`{field}` is not finite"),
        ));
    }
    if p < 0.0 {
        return Err(Rejection::new(
            RejectReason::NegativePrice,
            format!("`{field}` is negative"),
        ));
    }
    Ok(p)
}

fn id(field: &str, v: &str) -> Result<(), Rejection> {
    if v.trim().is_empty() {
        return Err(Rejection::new(
            RejectReason::EmptyId,
            format!("`{field}` is empty"),
        ));
    }
    Ok(())
}

/// A required string of a joined record (the joiner refuses `""` on input; a record written by an
/// older joiner, or by hand, is checked again here).
fn text(field: &str, v: &str) -> Result<(), Rejection> {
    if v.is_empty() {
        return Err(crate::validate::empty_field(field));
    }
    if v.len() > crate::validate::MAX_FIELD_BYTES {
        return Err(Rejection::new(
            RejectReason::FieldTooLong,
            format!(
                "`{field}` is longer than {} bytes",
                crate::validate::MAX_FIELD_BYTES
            ),
        ));
    }
    Ok(())
}

/// Enriches one attributed click.
pub fn enrich_click(
    rules: &EnrichRules,
    pair: JoinedRecord,
    processed_time_ms: i64,
) -> Result<EnrichedClick, Rejection> {
    id("impression_id", &pair.impression_id)?;
    id("click_id", &pair.click_id)?;
    id("campaign_id", &pair.campaign_id)?;
    id("ad_id", &pair.ad_id)?;
    id("publisher_id", &pair.publisher_id)?;
    for (field, value) in [
        ("device_type", &pair.device_type),
        ("geo_location", &pair.geo_location),
        ("platform", &pair.platform),
        ("ad_type", &pair.ad_type),
    ] {
        text(field, value)?;
    }
    let impression_time_ms = time("impression_time", &pair.impression_time)?;
    let click_time_ms = time("click_time", &pair.click_time)?;
    let bid = price("bid_price", pair.bid_price)?;
    let click_price = price("click_price", pair.click_price)?;
    Ok(EnrichedClick {
        impression_time_ms,
        click_time_ms,
        is_premium_ad: is_premium_ad(bid, rules.premium_bid_threshold),
        engagement_duration: engagement_duration(impression_time_ms, click_time_ms),
        platform_category: platform_category(&pair.device_type),
        click_revenue: click_revenue(click_price, rules.click_revenue_factor),
        processed_time_ms,
        pair,
    })
}

/// Enriches one forwarded impression.
pub fn enrich_impression(
    rules: &EnrichRules,
    impression: ImpressionRecord,
    processed_time_ms: i64,
) -> Result<EnrichedImpression, Rejection> {
    id("impression_id", &impression.impression_id)?;
    id("campaign_id", &impression.campaign_id)?;
    id("ad_id", &impression.ad_id)?;
    id("publisher_id", &impression.publisher_id)?;
    for (field, value) in [
        ("device_type", &impression.device_type),
        ("geo_location", &impression.geo_location),
        ("platform", &impression.platform),
        ("ad_type", &impression.ad_type),
    ] {
        text(field, value)?;
    }
    let impression_time_ms = time("impression_time", &impression.impression_time)?;
    let bid = price("bid_price", impression.bid_price)?;
    Ok(EnrichedImpression {
        impression_time_ms,
        is_premium_ad: is_premium_ad(bid, rules.premium_bid_threshold),
        platform_category: platform_category(&impression.device_type),
        processed_time_ms,
        impression,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn premium_threshold_is_strict() {
        assert_eq!(is_premium_ad(50.0, 50.0), "No");
        assert_eq!(is_premium_ad(50.000_001, 50.0), "Yes");
        assert_eq!(is_premium_ad(0.0, 50.0), "No");
        assert_eq!(is_premium_ad(10.0, 5.0), "Yes", "threshold is configurable");
    }

    #[test]
    fn engagement_truncates_toward_zero_and_keeps_the_sign() {
        assert_eq!(engagement_duration(0, 1_500), 1);
        assert_eq!(engagement_duration(0, -1_500), -1);
        assert_eq!(engagement_duration(0, 999), 0);
        assert_eq!(engagement_duration(0, -999), 0);
        assert_eq!(engagement_duration(0, 30_000), 30);
        assert_eq!(engagement_duration(10_000, 0), -10);
    }

    #[test]
    fn aliases_map_to_their_family_whatever_the_case_and_spacing() {
        for d in ["mobile", "Phone", " SMARTPHONE ", "android", "iOS"] {
            assert_eq!(platform_category(d), "Mobile", "{d}");
        }
        for d in ["tablet", "iPad"] {
            assert_eq!(platform_category(d), "Tablet", "{d}");
        }
        for d in ["desktop", "PC", "laptop", "Mac", "windows", "Linux\t"] {
            assert_eq!(platform_category(d), "Desktop", "{d}");
        }
        for d in ["", "tv", "SmartTV", "mobile phone", "ipadmini", "watch"] {
            assert_eq!(platform_category(d), "Other", "{d}");
        }
    }

    #[test]
    fn revenue_uses_the_factor() {
        assert!((click_revenue(1.0, 1.2) - 1.2).abs() < 1e-12);
        assert_eq!(click_revenue(0.0, 1.2), 0.0);
        assert_eq!(click_revenue(2.0, 1.5), 3.0);
    }

    proptest! {
        #[test]
        fn engagement_matches_truncated_real_division(imp in -1_000_000_000i64..1_000_000_000, delta in -100_000i64..100_000) {
            let expected = ((delta as f64) / 1000.0).trunc() as i64;
            prop_assert_eq!(engagement_duration(imp, imp + delta), expected);
        }

        #[test]
        fn premium_is_exactly_bid_above_threshold(bid in 0.0f64..200.0, threshold in 0.0f64..200.0) {
            prop_assert_eq!(is_premium_ad(bid, threshold) == "Yes", bid > threshold);
        }

        #[test]
        fn category_ignores_case_and_surrounding_space(
            alias in prop::sample::select(vec!["mobile", "phone", "smartphone", "android", "ios", "tablet", "ipad", "desktop", "pc", "laptop", "mac", "windows", "linux"]),
            upper in prop::collection::vec(any::<bool>(), 12),
            pad in "[ \t]{0,3}",
        ) {
            let mixed: String = alias.chars().zip(upper.iter().cycle()).map(|(c, u)| if *u { c.to_ascii_uppercase() } else { c }).collect();
            prop_assert_eq!(platform_category(&format!("{pad}{mixed}{pad}")), platform_category(alias));
            prop_assert_ne!(platform_category(alias), "Other");
        }

        #[test]
        fn unknown_devices_are_other(device in "[a-z]{1,12}") {
            let known = ["mobile", "phone", "smartphone", "android", "ios", "tablet", "ipad", "desktop", "pc", "laptop", "mac", "windows", "linux"];
            prop_assume!(!known.contains(&device.as_str()));
            prop_assert_eq!(platform_category(&device), "Other");
        }
    }
}
