//! Data file locations. iceberg-rust's default generator writes partition values into the path
//! verbatim, so a `campaign_id` of `../x` or `a/b` would shape the object key. Here every value
//! is percent-encoded into one key segment (as Java Iceberg URL-encodes them), so input can
//! never write outside the table's data location.

use adpipe_core::dead_letter::key_segment;
use iceberg::spec::PartitionKey;
use iceberg::writer::file_writer::location_generator::LocationGenerator;

/// `<table>/data/<field>=<escaped value>/.../<file>`.
#[derive(Debug, Clone)]
pub struct EscapingLocationGenerator {
    data_location: String,
}

impl EscapingLocationGenerator {
    pub fn new(table_location: &str) -> Self {
        EscapingLocationGenerator {
            data_location: format!("{}/data", table_location.trim_end_matches('/')),
        }
    }
}

/// The escaped partition path of a key: `field=value/...`.
pub fn partition_path(key: &PartitionKey) -> String {
    let Ok(partition_type) = key.spec().partition_type(key.schema()) else {
        return "unknown-partition".to_owned();
    };
    key.spec()
        .fields()
        .iter()
        .zip(partition_type.fields())
        .enumerate()
        .map(|(i, (field, ty))| {
            let human = field
                .transform
                .to_human_string(&ty.field_type, key.data()[i].as_ref());
            format!("{}={}", key_segment(&field.name), key_segment(&human))
        })
        .collect::<Vec<_>>()
        .join("/")
}

impl LocationGenerator for EscapingLocationGenerator {
    fn generate_location(&self, partition_key: Option<&PartitionKey>, file_name: &str) -> String {
        match partition_key {
            Some(key) if !PartitionKey::is_effectively_none(Some(key)) => {
                format!(
                    "{}/{}/{}",
                    self.data_location,
                    partition_path(key),
                    file_name
                )
            }
            _ => format!("{}/{}", self.data_location, file_name),
        }
    }
}
