//! Attribution latency: from a click's arrival on the clicks stream to its joined record's
//! arrival on the joined stream, both Kinesis' `ApproximateArrivalTimestamp`, per attributed
//! click (the first copy not flagged `recovered`).

use std::collections::BTreeMap;

use adpipe_core::model::{JoinedStreamRecord, RecordKind};
use aws_sdk_kinesis::Client;

use crate::LocalError;

/// Every record of a stream with its arrival time (epoch ms), shard by shard.
pub async fn read_with_arrival(
    kinesis: &Client,
    stream: &str,
) -> Result<Vec<(i64, Vec<u8>)>, LocalError> {
    crate::stream_read::read_stream(kinesis, stream, Some(10_000), |r| {
        let at = r
            .approximate_arrival_timestamp()
            .map(|t| t.secs() * 1000 + i64::from(t.subsec_nanos() / 1_000_000))
            .unwrap_or_default();
        (at, r.data.into_inner())
    })
    .await
}

/// Latencies in ms, one per attributed click found on both streams.
pub fn attribution_latencies(clicks: &[(i64, Vec<u8>)], joined: &[(i64, Vec<u8>)]) -> Vec<i64> {
    let mut arrived: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (at, data) in clicks {
        if let Ok(adpipe_core::model::Event::Click(c)) =
            adpipe_core::validate::decode(RecordKind::Click, data)
        {
            let e = arrived.entry((c.impression_id, c.click_id)).or_insert(*at);
            *e = (*e).min(*at);
        }
    }
    let mut joined_at: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (at, data) in joined {
        if let Ok(JoinedStreamRecord::Click(c)) = serde_json::from_slice(data) {
            if !c.recovered {
                let e = joined_at
                    .entry((c.impression_id, c.click_id))
                    .or_insert(*at);
                *e = (*e).min(*at);
            }
        }
    }
    let mut out: Vec<i64> = joined_at
        .iter()
        .filter_map(|(k, j)| arrived.get(k).map(|a| (j - a).max(0)))
        .collect();
    out.sort_unstable();
    out
}

/// The `p`-th percentile (0–100) of sorted values, nearest rank.
pub fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_joined_arrival_minus_the_clicks_first_arrival_for_unflagged_pairs() {
        let click = br#"{"ad_id":"a","impression_id":"i1","campaign_id":"c","publisher_id":"p","event_time":"2026-11-30T10:00:00Z","device_type":"mobile","geo_location":"US","platform":"ios","click_price":1.0,"click_id":"k1"}"#.to_vec();
        let imp = adpipe_core::model::Impression {
            ad_id: "a".into(),
            impression_id: "i1".into(),
            campaign_id: "c".into(),
            publisher_id: "p".into(),
            event_time_ms: 0,
            device_type: "mobile".into(),
            geo_location: "US".into(),
            platform: "ios".into(),
            ad_type: "banner".into(),
            bid_price: 1.0,
        };
        let Ok(adpipe_core::model::Event::Click(c)) =
            adpipe_core::validate::decode(RecordKind::Click, &click)
        else {
            panic!("a click")
        };
        let mut record = adpipe_core::model::JoinedRecord::new(&imp, &c);
        let first = serde_json::to_vec(&JoinedStreamRecord::Click(record.clone())).unwrap();
        record.recovered = true;
        let again = serde_json::to_vec(&JoinedStreamRecord::Click(record)).unwrap();
        let l = attribution_latencies(
            &[(1_000, click.clone()), (1_500, click)],
            &[(900, again), (2_250, first)],
        );
        assert_eq!(l, vec![1_250]);
        assert_eq!(percentile(&[1, 2, 3, 4], 50.0), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 99.0), Some(4));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
