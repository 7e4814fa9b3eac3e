//! The lake's two tables as Arrow schemas carrying Iceberg field ids, and the conversion of
//! enriched rows into Arrow record batches. Timestamps are zone-less microseconds holding UTC
//! (Iceberg `timestamp`, Athena `timestamp`).

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::enrich::{EnrichedClick, EnrichedImpression};

/// Arrow field metadata key for the Iceberg / Parquet field id.
pub const FIELD_ID_KEY: &str = "PARQUET:field_id";

/// Default table names (overridable by configuration).
pub const CLICKS_TABLE: &str = "enriched_clicks";
pub const IMPRESSIONS_TABLE: &str = "impressions";

/// Columns both tables are partitioned and sorted by: `hour(impression_time)`, then sorted by
/// `campaign_id` (tables created before 2026-11-30 are partitioned by `day(impression_time)`,
/// before 2026-11-29 by `identity(campaign_id)` too).
pub const PARTITION_SOURCE_COLUMNS: [&str; 2] = ["campaign_id", "impression_time"];

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Flag,
    Time,
    Money,
    Seconds,
}

fn field(id: i32, name: &str, kind: Kind, required: bool) -> Field {
    let dt = match kind {
        Kind::Text => DataType::Utf8,
        Kind::Flag => DataType::Boolean,
        Kind::Time => DataType::Timestamp(TimeUnit::Microsecond, None),
        Kind::Money => DataType::Float64,
        Kind::Seconds => DataType::Int64,
    };
    Field::new(name, dt, !required)
        .with_metadata(HashMap::from([(FIELD_ID_KEY.to_owned(), id.to_string())]))
}

const CLICK_COLUMNS: [(&str, Kind, bool); 24] = [
    ("impression_id", Kind::Text, true),
    ("click_id", Kind::Text, true),
    ("click_id_derived", Kind::Flag, false),
    ("ad_id", Kind::Text, false),
    ("campaign_id", Kind::Text, false),
    ("publisher_id", Kind::Text, false),
    ("impression_time", Kind::Time, false),
    ("click_time", Kind::Time, false),
    ("device_type", Kind::Text, false),
    ("geo_location", Kind::Text, false),
    ("platform", Kind::Text, false),
    ("ad_type", Kind::Text, false),
    ("bid_price", Kind::Money, false),
    ("click_price", Kind::Money, false),
    ("click_campaign_id", Kind::Text, false),
    ("click_publisher_id", Kind::Text, false),
    ("click_device_type", Kind::Text, false),
    ("click_geo_location", Kind::Text, false),
    ("click_platform", Kind::Text, false),
    ("is_premium_ad", Kind::Text, false),
    ("engagement_duration", Kind::Seconds, false),
    ("platform_category", Kind::Text, false),
    ("click_revenue", Kind::Money, false),
    ("processed_time", Kind::Time, false),
];

const IMPRESSION_COLUMNS: [(&str, Kind, bool); 13] = [
    ("impression_id", Kind::Text, true),
    ("ad_id", Kind::Text, false),
    ("campaign_id", Kind::Text, false),
    ("publisher_id", Kind::Text, false),
    ("impression_time", Kind::Time, false),
    ("device_type", Kind::Text, false),
    ("geo_location", Kind::Text, false),
    ("platform", Kind::Text, false),
    ("ad_type", Kind::Text, false),
    ("bid_price", Kind::Money, false),
    ("is_premium_ad", Kind::Text, false),
    ("platform_category", Kind::Text, false),
    ("processed_time", Kind::Time, false),
];

fn schema(columns: &[(&str, Kind, bool)]) -> SchemaRef {
    Arc::new(Schema::new(
        columns
            .iter()
            .enumerate()
            .map(|(i, (name, kind, required))| field(i as i32 + 1, name, *kind, *required))
            .collect::<Vec<_>>(),
    ))
}

/// `enriched_clicks`: one row per `(impression_id, click_id)`; field ids 1..=24 in order.
pub fn clicks_schema() -> SchemaRef {
    schema(&CLICK_COLUMNS)
}

/// `impressions`: one row per `impression_id`; field ids 1..=13 in order.
pub fn impressions_schema() -> SchemaRef {
    schema(&IMPRESSION_COLUMNS)
}

fn text<'a>(v: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(v))
}

fn micros(v: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from_iter_values(
        v.map(|ms| ms * 1000),
    ))
}

fn money(v: impl Iterator<Item = f64>) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(v))
}

/// The rows as a record batch of [`clicks_schema`].
pub fn clicks_batch(rows: &[EnrichedClick]) -> Result<RecordBatch, ArrowError> {
    let p = |f: fn(&EnrichedClick) -> &str| text(rows.iter().map(f));
    let columns: Vec<ArrayRef> = vec![
        p(|r| &r.pair.impression_id),
        p(|r| &r.pair.click_id),
        Arc::new(BooleanArray::from(
            rows.iter()
                .map(|r| Some(r.pair.click_id_derived))
                .collect::<Vec<_>>(),
        )),
        p(|r| &r.pair.ad_id),
        p(|r| &r.pair.campaign_id),
        p(|r| &r.pair.publisher_id),
        micros(rows.iter().map(|r| r.impression_time_ms)),
        micros(rows.iter().map(|r| r.click_time_ms)),
        p(|r| &r.pair.device_type),
        p(|r| &r.pair.geo_location),
        p(|r| &r.pair.platform),
        p(|r| &r.pair.ad_type),
        money(rows.iter().map(|r| r.pair.bid_price)),
        money(rows.iter().map(|r| r.pair.click_price)),
        p(|r| &r.pair.click_campaign_id),
        p(|r| &r.pair.click_publisher_id),
        p(|r| &r.pair.click_device_type),
        p(|r| &r.pair.click_geo_location),
        p(|r| &r.pair.click_platform),
        p(|r| r.is_premium_ad),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.engagement_duration),
        )),
        p(|r| r.platform_category),
        money(rows.iter().map(|r| r.click_revenue)),
        micros(rows.iter().map(|r| r.processed_time_ms)),
    ];
    RecordBatch::try_new(clicks_schema(), columns)
}

/// The rows as a record batch of [`impressions_schema`].
pub fn impressions_batch(rows: &[EnrichedImpression]) -> Result<RecordBatch, ArrowError> {
    let p = |f: fn(&EnrichedImpression) -> &str| text(rows.iter().map(f));
    let columns: Vec<ArrayRef> = vec![
        p(|r| &r.impression.impression_id),
        p(|r| &r.impression.ad_id),
        p(|r| &r.impression.campaign_id),
        p(|r| &r.impression.publisher_id),
        micros(rows.iter().map(|r| r.impression_time_ms)),
        p(|r| &r.impression.device_type),
        p(|r| &r.impression.geo_location),
        p(|r| &r.impression.platform),
        p(|r| &r.impression.ad_type),
        money(rows.iter().map(|r| r.impression.bid_price)),
        p(|r| r.is_premium_ad),
        p(|r| r.platform_category),
        micros(rows.iter().map(|r| r.processed_time_ms)),
    ];
    RecordBatch::try_new(impressions_schema(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_column_has_a_unique_sequential_field_id() {
        for s in [clicks_schema(), impressions_schema()] {
            for (i, f) in s.fields().iter().enumerate() {
                assert_eq!(
                    f.metadata()[FIELD_ID_KEY],
                    (i + 1).to_string(),
                    "{}",
                    f.name()
                );
            }
            for col in PARTITION_SOURCE_COLUMNS {
                assert!(s.field_with_name(col).is_ok());
            }
        }
        assert_eq!(clicks_schema().fields().len(), 24);
        assert_eq!(impressions_schema().fields().len(), 13);
    }

    #[test]
    fn timestamps_are_zoneless_microseconds() {
        let f = clicks_schema();
        assert_eq!(
            f.field_with_name("click_time").unwrap().data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, None)
        );
    }
}
