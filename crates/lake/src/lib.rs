//! `IcebergLake`: the enricher's `TableWriter`, appending to Iceberg format-v2 tables in the
//! Glue Data Catalog with iceberg-rust.
//!
//! Idempotency (see `docs/DESIGN.md`, "The lake"):
//! - data files are named after the input range (`InputRange::batch_id`), the attempt and the
//!   partition: an attempt never overwrites an object another attempt wrote (which a commit may
//!   list), and the files of a failed attempt are orphans that orphan file deletion removes;
//! - every commit records its input range in the snapshot summary and in the table's commit
//!   ledger (`adpipe_core::ledger`, a table property), and a batch found in the ledger is never
//!   appended again. After any commit error the table is reloaded and checked before retrying:
//!   a commit whose response was lost is not re-appended;
//! - the commit itself ([`commit`]) merges manifests and expires snapshots, so its cost does
//!   not grow with the table's age;
//! - a batch overlapping a committed range (Lambda's bisect-on-error re-splits batches) or a row
//!   flagged `recovered` is landed only if its key is not in the table yet;
//! - commits to one table are serialised by a DynamoDB lease, with bounded retries.

pub mod commit;
pub mod keycheck;
pub mod lease;
pub mod location;

mod append;
mod datafiles;
mod keys;
mod tables;

use std::collections::HashMap;
use std::sync::Arc;

use adpipe_core::ports::{InputRange, LakeTable, PortError};
use arrow_array::{Array, RecordBatch, StringArray};
use iceberg::arrow::arrow_schema_to_schema;
use iceberg::table::Table;
use iceberg::{Catalog, CatalogBuilder, NamespaceIdent, TableIdent};
use iceberg_catalog_glue::{GlueCatalog, GlueCatalogBuilder};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

pub use adpipe_core::ledger::{overlaps, sequence_cmp};
pub use commit::{CommitSettings, CommitStats};
pub use keycheck::{KeyCheckPlan, ManifestCache, ManifestReads, MANIFEST_CACHE_BYTES};
pub use keys::{key_check_candidates, query_plan, KeyScope};
pub use lease::DynamoDbCommitLease;
pub use tables::{property_changes, schema_additions, table_properties, SchemaPlan, TableSetup};

/// Snapshot summary keys recording the input a commit covers.
pub const BATCH_ID: &str = "adpipe.batch-id";
pub const INPUT_STREAM: &str = "adpipe.input.stream";
pub const INPUT_SHARD: &str = "adpipe.input.shard";
pub const INPUT_FIRST: &str = "adpipe.input.first-sequence";
pub const INPUT_LAST: &str = "adpipe.input.last-sequence";

/// Where the lake is and how to reach it.
#[derive(Debug, Clone)]
pub struct LakeConfig {
    /// `s3://bucket/prefix`: new tables go to `<warehouse>/<database>.db/<table>`.
    pub warehouse: String,
    /// The Glue database.
    pub database: String,
    pub clicks_table: String,
    pub impressions_table: String,
    /// Endpoint override (a local AWS-compatible server), also used for S3.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Static credentials (local endpoints); on Lambda the environment provides them.
    pub credentials: Option<(String, String)>,
    /// Parquet row groups hold at most this many rows.
    pub row_group_rows: usize,
    /// Commit attempts per table and batch (conflicts with concurrent writers).
    pub max_commit_attempts: u32,
    /// How commits keep the table's metadata bounded.
    pub commit: CommitSettings,
}

impl LakeConfig {
    /// The lake of `tables`, reached at `endpoint` (a local server) or through the
    /// environment's AWS configuration, with the default commit attempts.
    pub fn of_tables(
        tables: &adpipe_core::config::TablesConfig,
        endpoint: Option<String>,
        region: Option<String>,
        row_group_rows: usize,
    ) -> LakeConfig {
        LakeConfig {
            warehouse: tables.warehouse(),
            database: tables.database.clone(),
            clicks_table: tables.clicks_table.clone(),
            impressions_table: tables.impressions_table.clone(),
            endpoint,
            region,
            credentials: None,
            row_group_rows,
            max_commit_attempts: 5,
            commit: CommitSettings {
                snapshot_max_age_ms: tables.snapshot_max_age_ms,
                ledger: adpipe_core::ledger::LedgerLimits {
                    horizon_ms: tables.ledger_horizon_ms,
                    ..adpipe_core::ledger::LedgerLimits::default()
                },
                ..CommitSettings::default()
            },
        }
    }
}

/// The lake's Parquet settings: zstd at the codec's default level, row groups of at most
/// `row_group_rows`. Public so the benchmarks encode exactly as the enricher does.
pub fn writer_properties(row_group_rows: usize) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .build()
}

/// A Glue client configured as iceberg-rust's Glue catalog configures its own.
async fn glue_client(config: &LakeConfig) -> aws_sdk_glue::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(endpoint) = &config.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(region) = &config.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some((key, secret)) = &config.credentials {
        loader = loader.credentials_provider(aws_credential_types::Credentials::new(
            key,
            secret,
            None,
            None,
            "adpipe-lake",
        ));
    }
    aws_sdk_glue::Client::new(&loader.load().await)
}

pub(crate) fn lake_error(context: &str, e: iceberg::Error) -> PortError {
    let message = format!("{context}: {e}");
    if e.retryable() {
        PortError::Unavailable(message)
    } else {
        PortError::Rejected(message)
    }
}

/// The lake's tables in a Glue catalog.
pub struct IcebergLake {
    catalog: GlueCatalog,
    glue: aws_sdk_glue::Client,
    namespace: NamespaceIdent,
    config: LakeConfig,
    lease: DynamoDbCommitLease,
    owner: String,
    writer_props: WriterProperties,
    /// What the duplicate-key check has read of each manifest (manifests are immutable).
    manifests: ManifestCache,
}

impl std::fmt::Debug for IcebergLake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IcebergLake")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl IcebergLake {
    /// Connects to the catalog. `owner` names this writer in the commit lease.
    pub async fn connect(
        config: LakeConfig,
        lease: DynamoDbCommitLease,
        owner: String,
    ) -> Result<Self, PortError> {
        let mut props: HashMap<String, String> = HashMap::new();
        props.insert("warehouse".into(), config.warehouse.clone());
        if let Some(endpoint) = &config.endpoint {
            props.insert("uri".into(), endpoint.clone());
            props.insert("s3.endpoint".into(), endpoint.clone());
            // Local servers have no per-bucket DNS names.
            props.insert("s3.path-style-access".into(), "true".into());
        }
        if let Some(region) = &config.region {
            props.insert("region_name".into(), region.clone());
            props.insert("s3.region".into(), region.clone());
        }
        if let Some((key, secret)) = &config.credentials {
            props.insert("aws_access_key_id".into(), key.clone());
            props.insert("aws_secret_access_key".into(), secret.clone());
        }
        let catalog = GlueCatalogBuilder::default()
            .load("adpipe", props)
            .await
            .map_err(|e| lake_error("connecting to the Glue catalog", e))?;
        let writer_props = writer_properties(config.row_group_rows);
        let glue = glue_client(&config).await;
        Ok(IcebergLake {
            catalog,
            glue,
            namespace: NamespaceIdent::new(config.database.clone()),
            config,
            lease,
            owner,
            writer_props,
            manifests: ManifestCache::new(MANIFEST_CACHE_BYTES),
        })
    }

    pub fn catalog(&self) -> &GlueCatalog {
        &self.catalog
    }

    pub fn ident(&self, table: LakeTable) -> TableIdent {
        let name = match table {
            LakeTable::Clicks => &self.config.clicks_table,
            LakeTable::Impressions => &self.config.impressions_table,
        };
        TableIdent::new(self.namespace.clone(), name.clone())
    }
    async fn load(&self, ident: &TableIdent) -> Result<Table, PortError> {
        self.catalog
            .load_table(ident)
            .await
            .map_err(|e| lake_error("loading the table", e))
    }
}

/// The input range a snapshot's summary records, with its batch id.
pub fn snapshot_input(snapshot: &iceberg::spec::Snapshot) -> Option<(String, InputRange)> {
    let props = &snapshot.summary().additional_properties;
    Some((
        props.get(BATCH_ID)?.clone(),
        InputRange {
            stream: props.get(INPUT_STREAM)?.clone(),
            shard: props.get(INPUT_SHARD)?.clone(),
            first_sequence: props.get(INPUT_FIRST)?.clone(),
            last_sequence: props.get(INPUT_LAST)?.clone(),
        },
    ))
}

/// The input ranges committed in the table's current snapshot and its retained ancestors,
/// newest first (what `adpipe status` shows; exactly-once uses the ledger, [`commit::ledger_of`]).
pub fn committed_inputs(table: &Table) -> Vec<(String, InputRange)> {
    let metadata = table.metadata();
    let mut out = Vec::new();
    let mut next = metadata.current_snapshot().cloned();
    while let Some(snapshot) = next {
        out.extend(snapshot_input(&snapshot));
        next = snapshot
            .parent_snapshot_id()
            .and_then(|p| metadata.snapshot_by_id(p).cloned());
    }
    out
}

/// The string column `name` of `batch`.
pub(crate) fn string_column<'a>(
    batch: &'a RecordBatch,
    name: &str,
) -> Result<&'a StringArray, PortError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| PortError::Rejected(format!("batch has no string column {name}")))
}

/// Arrow → Iceberg schema of a lake table, for checks and tools.
pub fn iceberg_schema(table: LakeTable) -> Result<Arc<iceberg::spec::Schema>, PortError> {
    let arrow = match table {
        LakeTable::Clicks => adpipe_core::lake::clicks_schema(),
        LakeTable::Impressions => adpipe_core::lake::impressions_schema(),
    };
    arrow_schema_to_schema(&arrow)
        .map(Arc::new)
        .map_err(|e| lake_error("converting the schema", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: &str, last: &str) -> InputRange {
        InputRange {
            stream: "joined".into(),
            shard: "shardId-000000000000".into(),
            first_sequence: first.into(),
            last_sequence: last.into(),
        }
    }

    #[test]
    fn sequence_numbers_compare_as_big_decimals() {
        use std::cmp::Ordering::*;
        let long_a = "49656853465235457112345678901234567890123456789000";
        let long_b = "49656853465235457112345678901234567890123456789010";
        assert_eq!(sequence_cmp(long_a, long_b), Some(Less));
        assert_eq!(sequence_cmp("9", "10"), Some(Less));
        assert_eq!(sequence_cmp("0010", "9"), Some(Greater));
        assert_eq!(sequence_cmp("abc", "abd"), None);
        assert_eq!(sequence_cmp("abc", "abc"), Some(Equal));
    }

    #[test]
    fn bisected_retries_overlap_the_committed_range() {
        let committed = range("100", "200");
        assert!(overlaps(&committed, &range("100", "150")));
        assert!(overlaps(&committed, &range("150", "250")));
        assert!(!overlaps(&committed, &range("201", "300")));
        let mut other_shard = range("100", "200");
        other_shard.shard = "shardId-000000000001".into();
        assert!(!overlaps(&committed, &other_shard));
        assert!(
            overlaps(&range("x1", "x9"), &range("x1", "x5")),
            "shared endpoint"
        );
        assert!(
            !overlaps(&range("x1", "x9"), &range("x2", "x5")),
            "incomparable, no shared endpoint"
        );
    }
}
