//! The append's data files: rows split by the table's partition spec and sorted in its sort
//! order, written as Parquet files named after the input range and the partition.

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

/// Splits rows by partition (sorted, so file names are deterministic): the partition key and
/// the rows of each.
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

impl IcebergLake {
    pub(crate) async fn write_files(
        &self,
        table: &Table,
        batch_id: &str,
        rows: &RecordBatch,
    ) -> Result<Vec<DataFile>, PortError> {
        let mut files = Vec::new();
        for (key, part) in split_by_partition(table, rows)? {
            // Deterministic: same input range and partition → same object key.
            let names = DefaultFileNameGenerator::new(
                format!("{batch_id}-{}", short_hash(&partition_path(&key))),
                None,
                DataFileFormat::Parquet,
            );
            let parquet = ParquetWriterBuilder::new(
                self.writer_props.clone(),
                table.metadata().current_schema().clone(),
            );
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
        Ok(files)
    }
}
