//! The join rule: a click is attributed to an impression iff both ids agree and their event
//! times are at most the window apart, both ends inclusive, at millisecond precision.

use crate::model::{Click, Impression};

/// The join contract's tunables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinRules {
    /// Largest |click.event_time − impression.event_time| that still joins, inclusive.
    pub window_ms: i64,
    /// How long (processing time) one side waits for its partner. Past it the state is treated
    /// as absent even if DynamoDB's lazy TTL has not deleted it yet.
    pub retention_ms: i64,
}

impl Default for JoinRules {
    fn default() -> Self {
        JoinRules {
            window_ms: 30_000,
            retention_ms: 24 * 3600 * 1000,
        }
    }
}

/// Most clicks one impression id holds in the join state. A new click past it is refused
/// ([`Arrival::TooManyClicks`], dead-lettered as `too_many_clicks`) and nothing is written.
/// With the field limits of [`crate::validate`] this keeps every state item below DynamoDB's
/// 400 KB item limit whatever the input (the AWS adapter's tests build the largest possible
/// item and measure it); real traffic has one or two clicks per impression.
pub const MAX_CLICKS_PER_IMPRESSION: usize = 32;

/// **The join rule.** A click is attributed to an impression iff both ids agree and their event
/// times are at most `window_ms` apart, both ends inclusive, at millisecond precision.
pub fn attributes(rules: &JoinRules, imp: &Impression, click: &Click) -> bool {
    imp.impression_id == click.impression_id
        && imp.ad_id == click.ad_id
        && (click.event_time_ms - imp.event_time_ms).abs() <= rules.window_ms
}

/// A pair whose partners met only after the earlier one's retention had run out.
#[derive(Debug, Clone, PartialEq)]
pub struct LatePair {
    pub impression: Impression,
    pub click: Click,
    /// Milliseconds between the two arrivals (greater than the retention).
    pub arrival_gap_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_169_730_000;

    fn imp(id: &str, ad: &str, t: i64) -> Impression {
        Impression {
            ad_id: ad.into(),
            impression_id: id.into(),
            campaign_id: "camp".into(),
            publisher_id: "pub".into(),
            event_time_ms: t,
            device_type: "mobile".into(),
            geo_location: "US".into(),
            platform: "ios".into(),
            ad_type: "banner".into(),
            bid_price: 60.0,
        }
    }

    fn click(id: &str, imp_id: &str, ad: &str, t: i64) -> Click {
        Click {
            ad_id: ad.into(),
            impression_id: imp_id.into(),
            campaign_id: "camp".into(),
            publisher_id: "pub".into(),
            event_time_ms: t,
            device_type: "mobile".into(),
            geo_location: "US".into(),
            platform: "ios".into(),
            click_price: 1.0,
            click_id: id.into(),
            click_id_derived: false,
        }
    }

    #[test]
    fn window_edges_are_inclusive_at_thirty_seconds() {
        let r = JoinRules::default();
        let i = imp("i", "a", T0);
        assert!(attributes(&r, &i, &click("c", "i", "a", T0 + 30_000)));
        assert!(attributes(&r, &i, &click("c", "i", "a", T0 - 30_000)));
        assert!(!attributes(&r, &i, &click("c", "i", "a", T0 + 30_001)));
        assert!(!attributes(&r, &i, &click("c", "i", "a", T0 - 30_001)));
    }

    #[test]
    fn click_before_impression_in_event_time_joins() {
        let r = JoinRules::default();
        assert!(attributes(
            &r,
            &imp("i", "a", T0),
            &click("c", "i", "a", T0 - 1)
        ));
    }

    #[test]
    fn ad_id_mismatch_does_not_join() {
        let r = JoinRules::default();
        assert!(!attributes(
            &r,
            &imp("i", "a", T0),
            &click("c", "i", "b", T0)
        ));
    }

    #[test]
    fn window_is_configurable() {
        let r = JoinRules {
            window_ms: 5_000,
            ..JoinRules::default()
        };
        assert!(attributes(
            &r,
            &imp("i", "a", T0),
            &click("c", "i", "a", T0 + 5_000)
        ));
        assert!(!attributes(
            &r,
            &imp("i", "a", T0),
            &click("c", "i", "a", T0 + 5_001)
        ));
    }
}
