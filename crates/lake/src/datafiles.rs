//! The append's data files: rows brought to the table's current schema, split by its partition
//! spec and sorted in its sort order, written as Parquet files named after the input range, the
//! attempt and the partition.

use std::collections::BTreeMap;

use adpipe_core::ports::PortError;
use arrow_array::{Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use iceberg::spec::{
    DataFile, DataFileFormat, Literal, PartitionKey, PartitionSpec, Schema, Struct, Transform,
};
use iceberg::table::Table;
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::DefaultFileNameGenerator;
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};

use crate::location::{partition_path, EscapingLocationGenerator};
use crate::{lake_error, string_column, IcebergLake};

/// Splits rows by partition (in partition order): the partition key and the rows of each.
fn split_by_partition(
    table: &Table,
    rows: &RecordBatch,
) -> Result<Vec<(PartitionKey, RecordBatch)>, PortError> {
    let metadata = table.metadata();
    let schema = metadata.current_schema().clone();
    let spec = metadata.default_partition_spec().as_ref().clone();
    let values = partition_values(&schema, &spec, rows)?;
    let mut groups: BTreeMap<String, (Vec<Literal>, Vec<u32>)> = BTreeMap::new();
    for (row, v) in values.into_iter().enumerate() {
        let key = format!("{v:?}");
        groups
            .entry(key)
            .or_insert_with(|| (v, Vec::new()))
            .1
            .push(row as u32);
    }
    // Within a partition, rows in the tables' sort order: campaign, then impression time (the
    // row's position breaks ties, so the same rows always give the same file).
    let campaigns = string_column(rows, "campaign_id")?;
    let times = rows
        .column_by_name("impression_time")
        .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
        .ok_or_else(|| PortError::Rejected("batch has no impression_time column".into()))?;
    let mut out = Vec::new();
    for (_, (literals, mut rows_idx)) in groups {
        rows_idx.sort_by(|a, b| {
            let (a, b) = (*a as usize, *b as usize);
            (campaigns.value(a), times.value(a), a).cmp(&(campaigns.value(b), times.value(b), b))
        });
        let data: Struct = literals.into_iter().map(Some).collect();
        let key = PartitionKey::new(spec.clone(), schema.clone(), data);
        let idx = arrow_array::UInt32Array::from(rows_idx);
        let part = arrow_select::take::take_record_batch(rows, &idx)
            .map_err(|e| PortError::Rejected(format!("splitting rows by partition: {e}")))?;
        out.push((key, part));
    }
    Ok(out)
}

/// Each row's partition values under `spec`, in the order of its fields.
fn partition_values(
    schema: &Schema,
    spec: &PartitionSpec,
    rows: &RecordBatch,
) -> Result<Vec<Vec<Literal>>, PortError> {
    let mut values: Vec<Vec<Literal>> =
        vec![Vec::with_capacity(spec.fields().len()); rows.num_rows()];
    for field in spec.fields() {
        let source = schema.field_by_id(field.source_id).ok_or_else(|| {
            PortError::Rejected(format!(
                "partition source {} not in schema",
                field.source_id
            ))
        })?;
        let column = rows.column_by_name(&source.name).ok_or_else(|| {
            PortError::Rejected(format!("batch lacks partition column {}", source.name))
        })?;
        match field.transform {
            Transform::Identity => {
                let strings = column
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| {
                        PortError::Rejected(format!("{} is not a string column", source.name))
                    })?;
                for (row, v) in values.iter_mut().enumerate() {
                    v.push(Literal::string(strings.value(row)));
                }
            }
            Transform::Day | Transform::Hour => {
                let times = column
                    .as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .ok_or_else(|| {
                        PortError::Rejected(format!("{} is not a timestamp column", source.name))
                    })?;
                let hourly = field.transform == Transform::Hour;
                for (row, v) in values.iter_mut().enumerate() {
                    let us = times.value(row);
                    v.push(if hourly {
                        Literal::int(us.div_euclid(3_600_000_000) as i32)
                    } else {
                        Literal::date(us.div_euclid(86_400_000_000) as i32)
                    });
                }
            }
            other => {
                return Err(PortError::Rejected(format!(
                    "partition transform {other} is not supported"
                )));
            }
        }
    }
    Ok(values)
}

fn short_hash(s: &str) -> String {
    // FNV-1a: stable across builds and platforms (std's hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A token no other write of data files has: the time, the process and a counter, hashed.
fn attempt_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(crate::lease::now_ms());
    h.write_u32(std::process::id());
    h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", h.finish())
}

/// `rows` in the table's `schema`: the columns matched by name and given the table's field
/// ids; the table's columns the rows lack (foreign columns: another writer's) are null.
/// Returns the rows and how many columns were foreign. A column the table no longer has, one
/// of another type, or a required foreign column is refused with the column named.
pub fn conform(
    schema: &iceberg::spec::Schema,
    rows: &RecordBatch,
) -> Result<(RecordBatch, usize), PortError> {
    let refused = |m: String| PortError::Rejected(format!("the table's schema changed: {m}"));
    for field in rows.schema().fields() {
        if schema.field_by_name(field.name()).is_none() {
            return Err(refused(format!(
                "it has no column {} any more (removed or renamed by another writer)",
                field.name()
            )));
        }
    }
    let arrow = iceberg::arrow::schema_to_arrow_schema(schema)
        .map_err(|e| lake_error("converting the table's schema", e))?;
    let mut foreign = 0;
    let mut columns = Vec::with_capacity(arrow.fields().len());
    for field in arrow.fields() {
        match rows.column_by_name(field.name()) {
            Some(column) if column.data_type() == field.data_type() => columns.push(column.clone()),
            Some(column) => {
                return Err(refused(format!(
                    "column {} is {} in the table but {} in this version's rows",
                    field.name(),
                    field.data_type(),
                    column.data_type()
                )));
            }
            None if field.is_nullable() => {
                foreign += 1;
                columns.push(arrow_array::new_null_array(
                    field.data_type(),
                    rows.num_rows(),
                ));
            }
            None => {
                return Err(refused(format!(
                    "it has a required column {} this version does not write",
                    field.name()
                )));
            }
        }
    }
    let rows = RecordBatch::try_new(std::sync::Arc::new(arrow), columns)
        .map_err(|e| refused(format!("the rows do not fit it: {e}")))?;
    Ok((rows, foreign))
}

/// The data files of one write, and the table columns its rows left null.
pub(crate) struct Written {
    pub files: Vec<DataFile>,
    pub foreign_columns: usize,
}

impl IcebergLake {
    pub(crate) async fn write_files(
        &self,
        table: &Table,
        batch_id: &str,
        rows: &RecordBatch,
    ) -> Result<Written, PortError> {
        let schema = table.metadata().current_schema().clone();
        let (rows, foreign_columns) = conform(&schema, rows)?;
        // Never an object another attempt wrote: a file is immutable once a commit may list
        // it, so a retry (or a redelivery whose batch id left the ledger) writes new objects
        // and the files of a failed attempt are orphans, removed by orphan file deletion.
        let attempt = attempt_token();
        let mut files = Vec::new();
        for (key, part) in split_by_partition(table, &rows)? {
            let names = DefaultFileNameGenerator::new(
                format!("{batch_id}-{attempt}-{}", short_hash(&partition_path(&key))),
                None,
                DataFileFormat::Parquet,
            );
            let parquet = ParquetWriterBuilder::new(self.writer_props.clone(), schema.clone());
            let rolling = RollingFileWriterBuilder::new_with_default_file_size(
                parquet,
                table.file_io().clone(),
                EscapingLocationGenerator::new(table.metadata().location()),
                names,
            );
            let mut writer = DataFileWriterBuilder::new(rolling)
                .build(Some(key))
                .await
                .map_err(|e| lake_error("opening a data file", e))?;
            writer
                .write(part)
                .await
                .map_err(|e| lake_error("writing a data file", e))?;
            files.extend(
                writer
                    .close()
                    .await
                    .map_err(|e| lake_error("closing a data file", e))?,
            );
        }
        Ok(Written {
            files,
            foreign_columns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adpipe_core::ports::LakeTable;
    use iceberg::spec::{NestedField, PrimitiveType, Type};

    fn code_rows() -> RecordBatch {
        use adpipe_core::enrich::{enrich_impression, EnrichRules};
        use adpipe_core::model::{Impression, ImpressionRecord};
        let rows: Vec<_> = (0..3)
            .map(|i| {
                let imp = Impression {
                    ad_id: "ad-1".into(),
                    impression_id: format!("imp-{i}"),
                    campaign_id: "camp-1".into(),
                    publisher_id: "pub-1".into(),
                    event_time_ms: 1_795_132_800_000 + i,
                    device_type: "mobile".into(),
                    geo_location: "US".into(),
                    platform: "ios".into(),
                    ad_type: "banner".into(),
                    bid_price: 1.0,
                };
                let record = ImpressionRecord::new(&imp, false);
                enrich_impression(&EnrichRules::default(), record, imp.event_time_ms + 1).unwrap()
            })
            .collect();
        adpipe_core::lake::impressions_batch(&rows).unwrap()
    }

    fn with(fields: Vec<iceberg::spec::NestedFieldRef>) -> iceberg::spec::Schema {
        iceberg::spec::Schema::builder()
            .with_fields(fields)
            .build()
            .unwrap()
    }

    #[test]
    fn foreign_columns_are_null_and_the_tables_field_ids_are_written() {
        let code = crate::iceberg_schema(LakeTable::Impressions).unwrap();
        let mut fields: Vec<_> = code.as_struct().fields().to_vec();
        // An analyst's column in the middle of the ids, and ours renumbered after it.
        let last = fields.pop().unwrap();
        fields.push(std::sync::Arc::new(NestedField::optional(
            500,
            "analyst_note",
            Type::Primitive(PrimitiveType::String),
        )));
        let mut moved = last.as_ref().clone();
        moved.id = 501;
        fields.push(std::sync::Arc::new(moved));
        let (rows, foreign) = conform(&with(fields), &code_rows()).unwrap();
        assert_eq!(foreign, 1);
        assert_eq!(rows.num_rows(), 3);
        let note = rows.column_by_name("analyst_note").unwrap();
        assert_eq!(note.null_count(), 3);
        let id_of = |name: &str| {
            rows.schema()
                .field_with_name(name)
                .unwrap()
                .metadata()
                .get("PARQUET:field_id")
                .cloned()
        };
        assert_eq!(id_of(&last.name).as_deref(), Some("501"));
        assert_eq!(id_of("analyst_note").as_deref(), Some("500"));
    }

    #[test]
    fn a_column_gone_retyped_or_required_is_refused_by_name() {
        let code = crate::iceberg_schema(LakeTable::Impressions).unwrap();
        let fields: Vec<_> = code.as_struct().fields().to_vec();
        let message = |schema: iceberg::spec::Schema| match conform(&schema, &code_rows()) {
            Err(PortError::Rejected(m)) => m,
            other => panic!("not refused: {:?}", other.map(|(_, n)| n)),
        };
        let gone = message(with(fields[1..].to_vec()));
        assert!(
            gone.contains(&fields[0].name) && gone.contains("no column"),
            "{gone}"
        );
        let mut retyped = fields.clone();
        let mut f = retyped[9].as_ref().clone();
        *f.field_type = Type::Primitive(PrimitiveType::String);
        retyped[9] = std::sync::Arc::new(f);
        let m = message(with(retyped));
        assert!(m.contains(&fields[9].name), "{m}");
        let mut required = fields.clone();
        required.push(std::sync::Arc::new(NestedField::required(
            600,
            "must_fill",
            Type::Primitive(PrimitiveType::Long),
        )));
        let m = message(with(required));
        assert!(m.contains("must_fill"), "{m}");
    }
}
