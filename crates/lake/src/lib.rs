//! `IcebergLake`: the enricher's `TableWriter`, appending to Iceberg format-v2 tables in the
//! Glue Data Catalog with iceberg-rust.
//!
//! Idempotency (see `docs/DESIGN.md`, "The lake"):
//! - data files are named after the input range (`InputRange::batch_id`) and the partition, so
//!   a retried batch rewrites the same objects;
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use adpipe_core::ports::{AppendReport, InputRange, LakeAppend, LakeTable, PortError, TableWriter};
use arrow_array::{Array, BooleanArray, RecordBatch, StringArray, TimestampMicrosecondArray};
use futures::TryStreamExt;
use iceberg::arrow::arrow_schema_to_schema;
use iceberg::expr::Reference;
use iceberg::spec::{
    DataFile, DataFileFormat, Datum, Literal, NullOrder, PartitionKey, SortDirection, SortField,
    SortOrder, Struct, Transform, UnboundPartitionSpec,
};
use iceberg::table::Table;
use iceberg::transaction::{AddColumn, ApplyTransactionAction, Transaction};
use iceberg::writer::base_writer::data_file_writer::DataFileWriterBuilder;
use iceberg::writer::file_writer::location_generator::DefaultFileNameGenerator;
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use iceberg::{Catalog, CatalogBuilder, NamespaceIdent, TableCreation, TableIdent};
use iceberg_catalog_glue::{GlueCatalog, GlueCatalogBuilder};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

pub use commit::{CommitSettings, CommitStats};
pub use keycheck::{KeyCheckPlan, ManifestCache, ManifestReads, MANIFEST_CACHE_BYTES};
pub use lease::DynamoDbCommitLease;
use location::{partition_path, EscapingLocationGenerator};

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
            commit: CommitSettings::default(),
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

fn lake_error(context: &str, e: iceberg::Error) -> PortError {
    let message = format!("{context}: {e}");
    if e.retryable() {
        PortError::Unavailable(message)
    } else {
        PortError::Rejected(message)
    }
}

/// What [`IcebergLake::ensure_tables`] did to one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableSetup {
    /// It did not exist: created with this version's schema, partition spec and properties.
    Created,
    /// Missing from the catalog, but its location held metadata: registered from it, then
    /// brought to this version's schema (`added` columns).
    Registered { added: Vec<String> },
    /// It existed; `added` are the columns this version added to it (none when it matched).
    Existing { added: Vec<String> },
}

impl std::fmt::Display for TableSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, added) = match self {
            TableSetup::Created => return f.write_str("created"),
            TableSetup::Registered { added } => ("registered from its retained metadata", added),
            TableSetup::Existing { added } => ("exists", added),
        };
        if added.is_empty() {
            write!(f, "{what}, schema up to date")
        } else {
            write!(f, "{what}, columns added: {}", added.join(", "))
        }
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

    /// Where a new table of that name goes: `<warehouse>/<database>.db/<table>`, as a bucket
    /// and a key prefix without the trailing `/`.
    fn table_location(&self, table: LakeTable) -> Option<(String, String)> {
        let rest = self.config.warehouse.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let name = &self.ident(table).name().to_owned();
        let db = &self.config.database;
        let key = if prefix.is_empty() {
            format!("{db}.db/{name}")
        } else {
            format!("{prefix}/{db}.db/{name}")
        };
        Some((bucket.to_owned(), key))
    }

    /// The current metadata file of a table whose catalog entry is gone but whose location
    /// still holds Iceberg metadata (`metadata/<version>-<uuid>.metadata.json`): the file of the
    /// highest version. `Ok(None)` if the location holds no metadata. Two files of the highest
    /// version (a failed commit beside the committed one) cannot be told apart from the files
    /// alone, so that is an error for an operator to settle, never a guess.
    pub async fn retained_metadata(
        &self,
        s3: &aws_sdk_s3::Client,
        table: LakeTable,
    ) -> Result<Option<String>, PortError> {
        let Some((bucket, key)) = self.table_location(table) else {
            return Ok(None);
        };
        let prefix = format!("{key}/metadata/");
        let mut newest: Vec<(u64, String)> = Vec::new();
        let mut pages = s3
            .list_objects_v2()
            .bucket(&bucket)
            .prefix(&prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| adpipe_aws::error::port_error("S3 ListObjectsV2", e))?;
            for object in page.contents() {
                let Some(name) = object.key().and_then(|k| k.strip_prefix(&prefix)) else {
                    continue;
                };
                let Some(version) = name
                    .strip_suffix(".metadata.json")
                    .and_then(|stem| stem.split_once('-'))
                    .and_then(|(v, _)| v.parse::<u64>().ok())
                else {
                    continue;
                };
                let path = format!("s3://{bucket}/{prefix}{name}");
                match newest.first().map(|(v, _)| *v) {
                    Some(top) if version < top => {}
                    Some(top) if version == top => newest.push((version, path)),
                    _ => newest = vec![(version, path)],
                }
            }
        }
        match newest.len() {
            0 => Ok(None),
            1 => Ok(newest.pop().map(|(_, path)| path)),
            _ => Err(PortError::Rejected(format!(
                "s3://{bucket}/{prefix} holds {} metadata files of version {}: {}; register the \
                 table's current one by hand (docs/DEPLOY.md, \"Re-attaching a retained lake\")",
                newest.len(),
                newest[0].0,
                newest
                    .iter()
                    .map(|(_, p)| p.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Creates the database and both tables if they do not exist (format v2, partitioned by
    /// `hour(impression_time)`, sorted by `campaign_id` then `impression_time`, zstd Parquet),
    /// and brings an existing table's schema to this version's ([`IcebergLake::migrate_table`]).
    /// A table created by an older version keeps its partition spec: the writer splits rows by
    /// whatever spec the table has (`identity(campaign_id)` and `day(impression_time)` before
    /// 2026-11-29, `day(impression_time)` before 2026-11-30).
    ///
    /// A table missing from the catalog whose location already holds Iceberg metadata (its
    /// Glue database was deleted while the bucket was kept) is registered from its current
    /// metadata, never created anew: an empty table over the old location would hide every
    /// landed row, and its orphan-file cleanup could later delete them.
    pub async fn ensure_tables(
        &self,
        s3: &aws_sdk_s3::Client,
    ) -> Result<Vec<(LakeTable, TableSetup)>, PortError> {
        self.ensure_tables_with(
            s3,
            &[
                (LakeTable::Clicks, iceberg_schema(LakeTable::Clicks)?),
                (
                    LakeTable::Impressions,
                    iceberg_schema(LakeTable::Impressions)?,
                ),
            ],
        )
        .await
    }

    /// [`IcebergLake::ensure_tables`] with the given schemas (those of another version: the
    /// schema-evolution test creates tables as an older version did).
    pub async fn ensure_tables_with(
        &self,
        s3: &aws_sdk_s3::Client,
        schemas: &[(LakeTable, Arc<iceberg::spec::Schema>)],
    ) -> Result<Vec<(LakeTable, TableSetup)>, PortError> {
        let mut done = Vec::new();
        let exists = self
            .catalog
            .namespace_exists(&self.namespace)
            .await
            .map_err(|e| lake_error("checking the Glue database", e))?;
        if !exists {
            self.catalog
                .create_namespace(&self.namespace, HashMap::new())
                .await
                .map_err(|e| lake_error("creating the Glue database", e))?;
        }
        for (table, schema) in schemas {
            let (table, schema) = (*table, schema.as_ref().clone());
            let ident = self.ident(table);
            if self
                .catalog
                .table_exists(&ident)
                .await
                .map_err(|e| lake_error("checking a table", e))?
            {
                let added = self.migrate_table(table, &schema).await?;
                done.push((table, TableSetup::Existing { added }));
                continue;
            }
            if let Some(metadata) = self.retained_metadata(s3, table).await? {
                tracing::warn!(
                    table = %ident,
                    %metadata,
                    "table missing from the catalog but its location holds metadata: registering it"
                );
                self.catalog
                    .register_table(&ident, metadata)
                    .await
                    .map_err(|e| lake_error("registering a retained table", e))?;
                let added = self.migrate_table(table, &schema).await?;
                done.push((table, TableSetup::Registered { added }));
                continue;
            }
            let field_id = |name: &str| {
                schema
                    .field_by_name(name)
                    .map(|f| f.id)
                    .ok_or_else(|| PortError::Rejected(format!("schema has no column {name}")))
            };
            let (campaign, time) = (field_id("campaign_id")?, field_id("impression_time")?);
            // Partitioned by time only: a batch writes one file per table and event hour it
            // touches, however many campaigns it holds. Hours rather than days so that every
            // manifest's partition summary spans about an hour: a key check or a query of an
            // hour reads that hour's manifests, not the whole day's. Rows are sorted by
            // campaign, then time (the table's sort order, which compaction keeps), so a
            // campaign's rows sit together and its queries prune by column statistics.
            let spec = UnboundPartitionSpec::builder()
                .add_partition_field(time, "impression_hour", Transform::Hour)
                .map_err(|e| lake_error("building the partition spec", e))?
                .build();
            let sort = |id: i32| SortField {
                source_id: id,
                transform: Transform::Identity,
                direction: SortDirection::Ascending,
                null_order: NullOrder::First,
            };
            let order = SortOrder::builder()
                .with_order_id(1)
                .with_sort_field(sort(campaign))
                .with_sort_field(sort(time))
                .build_unbound()
                .map_err(|e| lake_error("building the sort order", e))?;
            let creation = TableCreation::builder()
                .name(ident.name().to_owned())
                .schema(schema)
                .partition_spec(spec)
                .sort_order(order)
                .properties([
                    ("write.format.default".to_owned(), "parquet".to_owned()),
                    (
                        "write.parquet.compression-codec".to_owned(),
                        "zstd".to_owned(),
                    ),
                    // Our own commit loop retries (after checking what landed); iceberg-rust's
                    // would re-apply an append whose response was lost.
                    ("commit.retry.num-retries".to_owned(), "0".to_owned()),
                ])
                .build();
            self.catalog
                .create_table(&self.namespace, creation)
                .await
                .map_err(|e| lake_error("creating a table", e))?;
            done.push((table, TableSetup::Created));
        }
        Ok(done)
    }

    /// Adds to an existing table the columns of `code` it lacks ([`schema_additions`]), as
    /// optional columns with new field ids, in one Iceberg schema update (`AddSchema` and
    /// `SetCurrentSchema`, guarded by the current schema id), under the table's commit lease.
    /// Data files written before keep their own schema: the added columns read as null there.
    /// Any other difference is refused with an error naming the column. Returns the names of
    /// the columns added (none when the table already matches).
    pub async fn migrate_table(
        &self,
        table: LakeTable,
        code: &iceberg::spec::Schema,
    ) -> Result<Vec<String>, PortError> {
        let ident = self.ident(table);
        let plan = |t: &Table| {
            schema_additions(
                t.metadata().current_schema(),
                code,
                t.metadata().last_column_id(),
            )
            .map_err(|m| PortError::Rejected(format!("table {ident}: {m}")))
        };
        if plan(&self.load(&ident).await?)?.is_empty() {
            return Ok(Vec::new());
        }
        let lease = self.lease.acquire(&ident.to_string(), &self.owner).await?;
        let result = async {
            // Again under the lease: another instance may have migrated it meanwhile.
            let current = self.load(&ident).await?;
            let added = plan(&current)?;
            if added.is_empty() {
                return Ok(Vec::new());
            }
            let tx = Transaction::new(&current);
            let mut update = tx.update_schema();
            for field in &added {
                update = update.add_column(AddColumn::optional(
                    &field.name,
                    field.field_type.as_ref().clone(),
                ));
            }
            let tx = update
                .apply(tx)
                .map_err(|e| lake_error("preparing the schema update", e))?;
            let migrated = tx
                .commit(&self.catalog)
                .await
                .map_err(|e| lake_error("committing the schema update", e))?;
            let left = plan(&migrated)?;
            if !left.is_empty() {
                return Err(PortError::Rejected(format!(
                    "table {ident}: the schema update left columns missing: {}",
                    left.iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let names: Vec<String> = added.iter().map(|f| f.name.clone()).collect();
            tracing::warn!(table = %ident, columns = ?names, "columns added to the table's schema");
            Ok(names)
        }
        .await;
        let released = self.lease.release(lease).await;
        let added = result?;
        released?;
        Ok(added)
    }

    /// What the duplicate-key check of rows within `scope` plans against `table`: the data
    /// files left after pruning by partition and column statistics, planned over this writer's
    /// manifest cache ([`keycheck`]). For a table with delete files, iceberg-rust's plan.
    pub async fn key_check_plan(
        &self,
        table: &Table,
        scope: &KeyScope,
    ) -> Result<KeyCheckPlan, PortError> {
        match keycheck::plan(table, &self.manifests, scope).await? {
            Some(plan) => Ok(plan),
            None => Ok(KeyCheckPlan {
                files: query_plan(table, scope).await?,
                ..KeyCheckPlan::default()
            }),
        }
    }

    /// Manifests the key check has fetched from storage, and served from its cache.
    pub fn manifest_reads(&self) -> ManifestReads {
        self.manifests.reads()
    }

    /// The keys among `candidates` that the table already holds, looked for within `scope`.
    async fn existing_keys(
        &self,
        table: &Table,
        lake_table: LakeTable,
        candidates: &[(String, String)],
        scope: &KeyScope,
    ) -> Result<HashSet<(String, String)>, PortError> {
        if candidates.is_empty() || table.metadata().current_snapshot().is_none() {
            return Ok(HashSet::new());
        }
        match keycheck::plan(table, &self.manifests, scope).await? {
            Some(plan) => {
                let wanted: HashSet<(String, String)> = candidates.iter().cloned().collect();
                keycheck::read_keys(table, lake_table, &plan, &wanted).await
            }
            None => existing_keys_by_scan(table, lake_table, candidates, scope).await,
        }
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

/// What a table's schema needs to become the code's: the code's columns it lacks, in order,
/// each to be added as an optional column.
///
/// The code's columns carry field ids 1..=N in order and new columns are only ever appended
/// (`adpipe_core::lake`), so a table of an older version holds a prefix of them. Anything else
/// is refused with the column named, never applied: a column of the table that the code no
/// longer has (a removal or a rename), a changed type or nullability, a column the code
/// declares required (old rows have no value for it), or field ids that would come out
/// different from the code's (a table whose `last_column_id` ran ahead, e.g. a column added
/// and dropped by hand). `last_column_id` is the table metadata's.
pub fn schema_additions(
    table: &iceberg::spec::Schema,
    code: &iceberg::spec::Schema,
    last_column_id: i32,
) -> Result<Vec<iceberg::spec::NestedFieldRef>, String> {
    let have = table.as_struct().fields();
    let want = code.as_struct().fields();
    for (i, t) in have.iter().enumerate() {
        let Some(c) = want.get(i) else {
            return Err(format!(
                "the table has column {} (field id {}), which this version's schema does not: \
                 removing a column is refused",
                t.name, t.id
            ));
        };
        if c.name != t.name {
            return Err(if code.field_by_name(&t.name).is_some() {
                format!(
                    "column {} is at position {} in the table but not in this version's \
                     schema (which has {} there): reordering columns is refused",
                    t.name,
                    i + 1,
                    c.name
                )
            } else {
                format!(
                    "the table has column {} (field id {}), which this version's schema does \
                     not (it has {} there): removing or renaming a column is refused",
                    t.name, t.id, c.name
                )
            });
        }
        if c.field_type != t.field_type {
            return Err(format!(
                "column {} is {} in the table but {} in this version's schema: changing a \
                 column's type is refused",
                t.name, t.field_type, c.field_type
            ));
        }
        if c.required != t.required {
            let word = |r: bool| if r { "required" } else { "optional" };
            return Err(format!(
                "column {} is {} in the table but {} in this version's schema: changing a \
                 column's nullability is refused",
                t.name,
                word(t.required),
                word(c.required)
            ));
        }
        if c.id != t.id {
            return Err(format!(
                "column {} has field id {} in the table but {} in this version's schema",
                t.name, t.id, c.id
            ));
        }
    }
    let added: Vec<iceberg::spec::NestedFieldRef> = want[have.len()..].to_vec();
    for (k, c) in added.iter().enumerate() {
        if c.required {
            return Err(format!(
                "new column {} is required in this version's schema; a column added to a \
                 table with rows must be optional (old rows have no value for it)",
                c.name
            ));
        }
        let assigned = last_column_id + 1 + k as i32;
        if c.id != assigned {
            return Err(format!(
                "new column {} would get field id {assigned} in the table (its last column id \
                 is {last_column_id}) but has {} in this version's schema",
                c.name, c.id
            ));
        }
    }
    Ok(added)
}

pub use adpipe_core::ledger::{overlaps, sequence_cmp};

fn string_column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray, PortError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| PortError::Rejected(format!("batch has no string column {name}")))
}

/// Where a row holding one of the candidate keys can be: in the candidates' campaigns and
/// within their impression-time range. Every copy of a record carries the same `campaign_id`
/// and `impression_time` as the first (they are the impression's, fixed when the joiner
/// stored it), so the scope is exact. It lets iceberg skip, before opening them, the files of
/// other partitions (`campaign_id`, day) and, by their column statistics, the files of the
/// same day whose impression times do not overlap: the check reads the files around the
/// batch's event time, not the table's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyScope {
    pub campaigns: std::collections::BTreeSet<String>,
    /// Impression times (zone-less microseconds, as the column), both ends inclusive.
    pub min_time_us: i64,
    pub max_time_us: i64,
}

impl KeyScope {
    /// The scope of the rows of `rows` selected by `pick`; `None` when none is.
    pub fn of_rows(rows: &RecordBatch, pick: &[bool]) -> Result<Option<KeyScope>, PortError> {
        let campaigns = string_column(rows, "campaign_id")?;
        let times = rows
            .column_by_name("impression_time")
            .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
            .ok_or_else(|| PortError::Rejected("batch has no impression_time column".into()))?;
        let mut scope: Option<KeyScope> = None;
        for (row, _) in pick.iter().enumerate().filter(|(_, p)| **p) {
            let (campaign, t) = (campaigns.value(row), times.value(row));
            let s = scope.get_or_insert_with(|| KeyScope {
                campaigns: Default::default(),
                min_time_us: t,
                max_time_us: t,
            });
            s.campaigns.insert(campaign.to_owned());
            s.min_time_us = s.min_time_us.min(t);
            s.max_time_us = s.max_time_us.max(t);
        }
        Ok(scope)
    }

    fn predicate(&self) -> iceberg::expr::Predicate {
        let time = || Reference::new("impression_time");
        Reference::new("campaign_id")
            .is_in(self.campaigns.iter().map(|c| Datum::string(c.as_str())))
            .and(time().greater_than_or_equal_to(Datum::timestamp_micros(self.min_time_us)))
            .and(time().less_than_or_equal_to(Datum::timestamp_micros(self.max_time_us)))
    }
}

/// The rows of `append` the key check looks for (per row), and their keys: the flagged ones, or
/// all of them when the batch overlaps a committed range.
pub fn key_check_candidates(
    append: &LakeAppend,
    overlap: bool,
) -> (Vec<bool>, Vec<(String, String)>) {
    let pick: Vec<bool> = append.in_doubt.iter().map(|d| overlap || *d).collect();
    let keys = append
        .keys
        .iter()
        .zip(&pick)
        .filter(|(_, p)| **p)
        .map(|(k, _)| k.clone())
        .collect();
    (pick, keys)
}

/// The scan of the key check: the candidates' key columns, filtered on their ids within
/// `scope`.
fn key_scan(
    table: &Table,
    lake_table: LakeTable,
    candidates: &[(String, String)],
    scope: &KeyScope,
) -> Result<iceberg::scan::TableScan, PortError> {
    let ids: BTreeMap<&str, ()> = candidates.iter().map(|(i, _)| (i.as_str(), ())).collect();
    let filter = scope
        .predicate()
        .and(Reference::new("impression_id").is_in(ids.keys().map(|i| Datum::string(*i))));
    let columns: Vec<&str> = match lake_table {
        LakeTable::Clicks => vec!["impression_id", "click_id"],
        LakeTable::Impressions => vec!["impression_id"],
    };
    table
        .scan()
        .select(columns)
        .with_filter(filter)
        .build()
        .map_err(|e| lake_error("planning the key check", e))
}

/// What a query of `scope` (campaigns and an impression-time range, as a dashboard asks)
/// plans with iceberg-rust's scan: the data files (path and bytes) left after partition and
/// column-statistics pruning. Athena prunes with the same metadata, so this is the check that a
/// one-campaign, one-hour query reads few files; the key check's own planning
/// ([`IcebergLake::key_check_plan`]) is tested against it.
pub async fn query_plan(table: &Table, scope: &KeyScope) -> Result<Vec<(String, u64)>, PortError> {
    if table.metadata().current_snapshot().is_none() {
        return Ok(Vec::new());
    }
    let tasks: Vec<iceberg::scan::FileScanTask> = table
        .scan()
        .with_filter(scope.predicate())
        .build()
        .map_err(|e| lake_error("planning the query", e))?
        .plan_files()
        .await
        .map_err(|e| lake_error("planning the query", e))?
        .try_collect()
        .await
        .map_err(|e| lake_error("planning the query", e))?;
    Ok(tasks
        .into_iter()
        .map(|t| (t.data_file_path, t.file_size_in_bytes))
        .collect())
}

/// The keys among `candidates` that the table already holds, looked for within `scope` with
/// iceberg-rust's scan (tables with delete files, which it applies). The caller has checked
/// that there are candidates and a snapshot.
async fn existing_keys_by_scan(
    table: &Table,
    lake_table: LakeTable,
    candidates: &[(String, String)],
    scope: &KeyScope,
) -> Result<HashSet<(String, String)>, PortError> {
    let scan = key_scan(table, lake_table, candidates, scope)?;
    let batches: Vec<RecordBatch> = scan
        .to_arrow()
        .await
        .map_err(|e| lake_error("scanning for existing keys", e))?
        .try_collect()
        .await
        .map_err(|e| lake_error("reading existing keys", e))?;
    let mut out = HashSet::new();
    for b in &batches {
        let imp = string_column(b, "impression_id")?;
        let click = match lake_table {
            LakeTable::Clicks => Some(string_column(b, "click_id")?),
            LakeTable::Impressions => None,
        };
        for row in 0..b.num_rows() {
            let c = click.map(|c| c.value(row).to_owned()).unwrap_or_default();
            out.insert((imp.value(row).to_owned(), c));
        }
    }
    Ok(out)
}

/// Splits rows by partition (sorted, so file names are deterministic): the partition key and
/// the rows of each.
fn split_by_partition(
    table: &Table,
    rows: &RecordBatch,
) -> Result<Vec<(PartitionKey, RecordBatch)>, PortError> {
    let metadata = table.metadata();
    let schema = metadata.current_schema().clone();
    let spec = metadata.default_partition_spec().as_ref().clone();
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
    async fn write_files(
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

    /// One commit attempt under the lease. `Ok(None)`: the range was already in the table.
    async fn commit_once(
        &self,
        ident: &TableIdent,
        batch_id: &str,
        input: &InputRange,
        files: &[DataFile],
        loaded: &Table,
    ) -> Result<Option<CommitStats>, PortError> {
        let lease = self.lease.acquire(&ident.to_string(), &self.owner).await?;
        let result = async {
            // The catalog entry first: its version guards the update, so whatever changes the
            // table after this read fails the commit instead of being overwritten. The table
            // loaded before the lease is reused when it is still the current one (the usual
            // case: the lease holder's time is what bounds a table's commits per second).
            let entry = commit::glue_entry(&self.glue, &self.config.database, ident.name()).await?;
            let table = if loaded.metadata_location() == Some(entry.metadata_location.as_str()) {
                loaded.clone()
            } else {
                self.load(ident).await?
            };
            if table.metadata_location() != Some(entry.metadata_location.as_str()) {
                return Err(PortError::Unavailable(format!(
                    "{ident} changed while it was being read; retrying"
                )));
            }
            let mut ledger = commit::ledger_of(&table, self.config.commit.ledger)?;
            if ledger.has_batch(input, batch_id) {
                return Ok(None);
            }
            ledger.record(input, batch_id, lease::now_ms(), self.config.commit.ledger);
            let props = HashMap::from([
                (BATCH_ID.to_owned(), batch_id.to_owned()),
                (INPUT_STREAM.to_owned(), input.stream.clone()),
                (INPUT_SHARD.to_owned(), input.shard.clone()),
                (INPUT_FIRST.to_owned(), input.first_sequence.clone()),
                (INPUT_LAST.to_owned(), input.last_sequence.clone()),
            ]);
            let (staged, stats) =
                commit::stage_append(&table, files, props, &ledger, &self.config.commit).await?;
            commit::publish(&self.glue, &self.config.database, &entry, &table, &staged).await?;
            Ok(Some(stats))
        }
        .await;
        let released = self.lease.release(lease).await;
        let stats = result?;
        released?;
        Ok(stats)
    }

    /// Whether the table's ledger holds exactly this batch (after a commit whose outcome is
    /// unknown).
    async fn has_batch(&self, ident: &TableIdent, input: &InputRange, batch_id: &str) -> bool {
        match self.load(ident).await {
            Ok(table) => commit::ledger_of(&table, self.config.commit.ledger)
                .is_ok_and(|l| l.has_batch(input, batch_id)),
            Err(_) => false,
        }
    }
}

impl TableWriter for IcebergLake {
    async fn append(&self, append: LakeAppend) -> Result<AppendReport, PortError> {
        let ident = self.ident(append.table);
        let batch_id = append.input.batch_id();
        let mut report = AppendReport::default();
        let table = self.load(&ident).await?;
        let ledger = commit::ledger_of(&table, self.config.commit.ledger)?;
        if ledger.has_batch(&append.input, &batch_id) {
            report.already_committed = true;
            return Ok(report);
        }

        // Rows that may already be there: flagged repeats, and every row of a batch that
        // overlaps a committed range (a re-split retry of work that landed).
        let overlap = ledger.overlaps(&append.input);
        let (pick, doubtful) = key_check_candidates(&append, overlap);
        let existing = match KeyScope::of_rows(&append.rows, &pick)? {
            Some(scope) => {
                self.existing_keys(&table, append.table, &doubtful, &scope)
                    .await?
            }
            None => HashSet::new(),
        };
        let keep: Vec<bool> = append
            .keys
            .iter()
            .zip(&append.in_doubt)
            .map(|(k, d)| !((overlap || *d) && existing.contains(k)))
            .collect();
        report.duplicates_dropped = keep.iter().filter(|k| !**k).count() as u64;
        let rows = if report.duplicates_dropped == 0 {
            append.rows
        } else {
            arrow_select::filter::filter_record_batch(&append.rows, &BooleanArray::from(keep))
                .map_err(|e| PortError::Rejected(format!("dropping duplicate rows: {e}")))?
        };
        if rows.num_rows() == 0 {
            return Ok(report);
        }

        let files = self.write_files(&table, &batch_id, &rows).await?;
        report.files_written = files.len() as u64;
        report.bytes_written = files.iter().map(|f| f.file_size_in_bytes()).sum();
        report.rows_written = files.iter().map(|f| f.record_count()).sum();

        let attempts = self.config.max_commit_attempts.max(1);
        for attempt in 1..=attempts {
            match self
                .commit_once(&ident, &batch_id, &append.input, &files, &table)
                .await
            {
                Ok(stats) => {
                    report.already_committed = stats.is_none();
                    if stats.is_none() {
                        report.rows_written = 0;
                    }
                    return Ok(report);
                }
                Err(e) => {
                    // Never re-append blindly: the failed attempt may have landed.
                    if self.has_batch(&ident, &append.input, &batch_id).await {
                        return Ok(report);
                    }
                    if attempt == attempts {
                        return Err(e);
                    }
                    report.commit_retries += 1;
                    tracing::warn!(table = %ident, attempt, error = %e, "lake commit failed; retrying");
                }
            }
        }
        Ok(report)
    }
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

    #[test]
    fn the_key_scope_covers_exactly_the_picked_rows() {
        let rows = RecordBatch::try_from_iter([
            (
                "campaign_id",
                Arc::new(StringArray::from(vec!["c1", "c2", "c3", "c1"])) as Arc<dyn Array>,
            ),
            (
                "impression_time",
                Arc::new(TimestampMicrosecondArray::from(vec![50, 10, 99, 20])) as Arc<dyn Array>,
            ),
        ])
        .unwrap();
        let scope = KeyScope::of_rows(&rows, &[true, false, false, true])
            .unwrap()
            .unwrap();
        assert_eq!(
            scope,
            KeyScope {
                campaigns: ["c1".to_owned()].into(),
                min_time_us: 20,
                max_time_us: 50,
            }
        );
        let all = KeyScope::of_rows(&rows, &[true; 4]).unwrap().unwrap();
        assert_eq!(all.campaigns.len(), 3);
        assert_eq!((all.min_time_us, all.max_time_us), (10, 99));
        assert_eq!(KeyScope::of_rows(&rows, &[false; 4]).unwrap(), None);
        let text = format!("{}", scope.predicate());
        assert!(
            text.contains("campaign_id") && text.contains("impression_time"),
            "{text}"
        );
    }

    fn range(first: &str, last: &str) -> InputRange {
        InputRange {
            stream: "joined".into(),
            shard: "shardId-000000000000".into(),
            first_sequence: first.into(),
            last_sequence: last.into(),
        }
    }

    fn with_fields(fields: Vec<iceberg::spec::NestedField>) -> iceberg::spec::Schema {
        iceberg::spec::Schema::builder()
            .with_fields(fields.into_iter().map(Arc::new))
            .build()
            .unwrap()
    }

    fn code_fields() -> Vec<iceberg::spec::NestedField> {
        iceberg_schema(LakeTable::Impressions)
            .unwrap()
            .as_struct()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect()
    }

    #[test]
    fn a_table_of_an_older_version_gets_the_appended_columns() {
        let code = with_fields(code_fields());
        let n = code_fields().len();
        let table = with_fields(code_fields()[..n - 2].to_vec());
        let added = schema_additions(&table, &code, (n - 2) as i32).unwrap();
        let names: Vec<&str> = added.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["platform_category", "processed_time"]);
        assert!(schema_additions(&code, &code, n as i32).unwrap().is_empty());
    }

    #[test]
    fn every_other_schema_difference_is_refused_with_the_column_named() {
        let n = code_fields().len();
        let code = with_fields(code_fields());
        let refused = |table: Vec<iceberg::spec::NestedField>, last: i32, words: &[&str]| {
            let message = schema_additions(&with_fields(table), &code, last).unwrap_err();
            for w in words {
                assert!(message.contains(w), "{w:?} not in {message:?}");
            }
        };
        // A type change.
        let mut retyped = code_fields();
        *retyped[9].field_type =
            iceberg::spec::Type::Primitive(iceberg::spec::PrimitiveType::String);
        refused(retyped, n as i32, &["bid_price", "type"]);
        // A column the code no longer has.
        let mut extra = code_fields();
        extra.push(iceberg::spec::NestedField::optional(
            n as i32 + 1,
            "dropped_later",
            iceberg::spec::Type::Primitive(iceberg::spec::PrimitiveType::Long),
        ));
        refused(extra, n as i32 + 1, &["dropped_later", "removing"]);
        // A rename.
        let mut renamed = code_fields();
        renamed[1].name = "advert_id".into();
        refused(renamed, n as i32, &["advert_id", "renaming"]);
        // Nullability.
        let mut required = code_fields();
        required[1].required = true;
        refused(required, n as i32, &["ad_id", "nullability"]);
        // Field ids that would not match the code's (a column added and dropped by hand).
        refused(
            code_fields()[..n - 1].to_vec(),
            n as i32 + 3,
            &["processed_time", "field id"],
        );
        // A new column the code declares required.
        let mut code_required = code_fields();
        code_required[n - 1].required = true;
        let message = schema_additions(
            &with_fields(code_fields()[..n - 1].to_vec()),
            &with_fields(code_required),
            (n - 1) as i32,
        )
        .unwrap_err();
        assert!(message.contains("must be optional"), "{message}");
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
