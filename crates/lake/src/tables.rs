//! Table setup: the lake's tables created (schema, hourly partition spec, sort order,
//! properties), registered again from the metadata their location retains, and brought to this
//! version's schema.

use std::collections::HashMap;
use std::sync::Arc;

use adpipe_core::ports::{LakeTable, PortError};
use iceberg::spec::{
    NullOrder, SortDirection, SortField, SortOrder, Transform, UnboundPartitionSpec,
};
use iceberg::table::Table;
use iceberg::transaction::{AddColumn, ApplyTransactionAction, Transaction};
use iceberg::{Catalog, TableCreation, TableIdent};

use crate::{iceberg_schema, lake_error, CommitSettings, IcebergLake};

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

impl IcebergLake {
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
        self.ensure_database().await?;
        let mut done = Vec::new();
        for (table, schema) in schemas {
            let setup = self
                .ensure_table(s3, *table, schema.as_ref().clone())
                .await?;
            done.push((*table, setup));
        }
        Ok(done)
    }

    /// Creates the Glue database if it does not exist.
    async fn ensure_database(&self) -> Result<(), PortError> {
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
        Ok(())
    }

    /// One table of [`IcebergLake::ensure_tables_with`]: migrated to `schema` if it exists,
    /// registered from its retained metadata (then migrated) if its location holds some, else
    /// created ([`table_creation`]).
    async fn ensure_table(
        &self,
        s3: &aws_sdk_s3::Client,
        table: LakeTable,
        schema: iceberg::spec::Schema,
    ) -> Result<TableSetup, PortError> {
        let ident = self.ident(table);
        if self
            .catalog
            .table_exists(&ident)
            .await
            .map_err(|e| lake_error("checking a table", e))?
        {
            let added = self.migrate_table(table, &schema).await?;
            self.ensure_properties(table).await?;
            return Ok(TableSetup::Existing { added });
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
            self.ensure_properties(table).await?;
            return Ok(TableSetup::Registered { added });
        }
        self.catalog
            .create_table(
                &self.namespace,
                table_creation(&ident, schema, &self.config.commit)?,
            )
            .await
            .map_err(|e| lake_error("creating a table", e))?;
        Ok(TableSetup::Created)
    }

    /// Brings an existing table's properties to the lake's ([`property_changes`]), in one
    /// Iceberg properties update under the table's commit lease. Other properties are left as
    /// they are.
    pub async fn ensure_properties(&self, table: LakeTable) -> Result<(), PortError> {
        let ident = self.ident(table);
        let changes = |t: &Table| property_changes(t.metadata().properties(), &self.config.commit);
        let (set, remove) = changes(&self.load(&ident).await?);
        if set.is_empty() && remove.is_empty() {
            return Ok(());
        }
        let lease = self.lease.acquire(&ident.to_string(), &self.owner).await?;
        let result = async {
            let current = self.load(&ident).await?;
            let (set, remove) = changes(&current);
            if set.is_empty() && remove.is_empty() {
                return Ok(());
            }
            let tx = Transaction::new(&current);
            let mut update = tx.update_table_properties();
            for (k, v) in &set {
                update = update.set(k.clone(), v.clone());
            }
            for k in &remove {
                update = update.remove(k.clone());
            }
            update
                .apply(tx)
                .map_err(|e| lake_error("preparing the properties update", e))?
                .commit(&self.catalog)
                .await
                .map_err(|e| lake_error("committing the properties update", e))?;
            tracing::warn!(table = %ident, set = ?set, removed = ?remove, "table properties updated");
            Ok(())
        }
        .await;
        let released = self.lease.release(lease).await;
        result?;
        released
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
            let plan = schema_additions(t.metadata().current_schema(), code)
                .map_err(|m| PortError::Rejected(format!("table {ident}: {m}")))?;
            if !plan.foreign.is_empty() {
                tracing::warn!(
                    table = %ident,
                    columns = ?plan.foreign,
                    "the table has columns this version does not write: its rows hold null there"
                );
            }
            Ok::<_, PortError>(plan.added)
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
}

/// A new table of `schema`: format v2, partitioned by `hour(impression_time)`, sorted by
/// `campaign_id` then `impression_time`, with the lake's [`table_properties`].
fn table_creation(
    ident: &TableIdent,
    schema: iceberg::spec::Schema,
    commit: &CommitSettings,
) -> Result<TableCreation, PortError> {
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
    Ok(TableCreation::builder()
        .name(ident.name().to_owned())
        .schema(schema)
        .partition_spec(spec)
        .sort_order(order)
        .properties(table_properties(commit))
        .build())
}

/// Table properties every lake table carries, Iceberg's own names, so that every writer of
/// the table (Glue's optimizers, Athena, Spark, pyiceberg) works by the same rules:
/// - Parquet with zstd;
/// - snapshots expire by age ([`CommitSettings::snapshot_max_age_ms`]), keeping at least
///   [`CommitSettings::min_snapshots`]: what the enricher's commit does, and what Java's
///   `ExpireSnapshots` and Glue's retention read;
/// - a commit deletes the metadata files that fall out of the metadata log, which keeps
///   [`CommitSettings::previous_metadata`] of them.
///
/// `commit.retry.num-retries` is not set: every other writer keeps its own default (Java: 4).
pub fn table_properties(commit: &CommitSettings) -> Vec<(String, String)> {
    [
        ("write.format.default", "parquet".to_owned()),
        ("write.parquet.compression-codec", "zstd".to_owned()),
        (
            "history.expire.max-snapshot-age-ms",
            commit.snapshot_max_age_ms.to_string(),
        ),
        (
            "history.expire.min-snapshots-to-keep",
            commit.min_snapshots.to_string(),
        ),
        (
            "write.metadata.delete-after-commit.enabled",
            "true".to_owned(),
        ),
        (
            "write.metadata.previous-versions-max",
            commit.previous_metadata.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Properties earlier versions set that no table should keep: `commit.retry.num-retries=0`
/// gave every other writer zero retries on a conflict.
const RETIRED_PROPERTIES: &[(&str, &str)] = &[("commit.retry.num-retries", "0")];

/// What to set and remove to bring `current` to the lake's properties.
pub fn property_changes(
    current: &HashMap<String, String>,
    commit: &CommitSettings,
) -> (Vec<(String, String)>, Vec<String>) {
    let set = table_properties(commit)
        .into_iter()
        .filter(|(k, v)| current.get(k) != Some(v))
        .collect();
    let remove = RETIRED_PROPERTIES
        .iter()
        .filter(|(k, v)| current.get(*k).map(String::as_str) == Some(*v))
        .map(|(k, _)| (*k).to_owned())
        .collect();
    (set, remove)
}

/// How a table's schema relates to the code's: the code's columns it lacks (to be added) and
/// its columns the code does not know (foreign: written as null).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchemaPlan {
    /// The code's columns the table lacks, in the code's order, each to be added as an
    /// optional column (the table assigns its field id).
    pub added: Vec<iceberg::spec::NestedFieldRef>,
    /// The table's columns the code does not have (an analyst's `ALTER TABLE ADD COLUMNS`,
    /// another writer's): every row the enricher writes holds null there.
    pub foreign: Vec<String>,
}

/// What a table's schema needs to take the code's rows, columns matched by name (the table's
/// field ids are the ones written).
///
/// Accepted: the code's columns the table lacks, if they come after every code column the
/// table has (a table of an older version: new columns are only ever appended,
/// `adpipe_core::lake`) and are optional (old rows have no value for them); and optional
/// columns of the table the code does not know (foreign columns, null in the enricher's rows).
/// Refused loudly, with the column named, never applied: a code column of another type or
/// nullability in the table; a code column missing before one the table has (a column
/// removed or renamed); a required foreign column (the enricher cannot fill it).
pub fn schema_additions(
    table: &iceberg::spec::Schema,
    code: &iceberg::spec::Schema,
) -> Result<SchemaPlan, String> {
    let want = code.as_struct().fields();
    let mut plan = SchemaPlan::default();
    for t in table.as_struct().fields() {
        let Some(c) = code.field_by_name(&t.name) else {
            if t.required {
                return Err(format!(
                    "the table has a required column {} (field id {}), which this version \
                     does not write: it cannot fill it",
                    t.name, t.id
                ));
            }
            plan.foreign.push(t.name.clone());
            continue;
        };
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
    }
    let present = |c: &iceberg::spec::NestedFieldRef| table.field_by_name(&c.name).is_some();
    let last_present = want.iter().rposition(present);
    for (i, c) in want.iter().enumerate() {
        if present(c) {
            continue;
        }
        if last_present.is_some_and(|last| i < last) {
            let foreign = if plan.foreign.is_empty() {
                String::new()
            } else {
                format!(" (columns only the table has: {})", plan.foreign.join(", "))
            };
            return Err(format!(
                "the table lacks column {}, which this version writes, but has columns after \
                 it: removing or renaming a column is refused{foreign}",
                c.name
            ));
        }
        if c.required {
            return Err(format!(
                "new column {} is required in this version's schema; a column added to a \
                 table with rows must be optional (old rows have no value for it)",
                c.name
            ));
        }
        plan.added.push(c.clone());
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn optional(id: i32, name: &str) -> iceberg::spec::NestedField {
        iceberg::spec::NestedField::optional(
            id,
            name,
            iceberg::spec::Type::Primitive(iceberg::spec::PrimitiveType::String),
        )
    }

    #[test]
    fn a_table_of_an_older_version_gets_the_appended_columns() {
        let code = with_fields(code_fields());
        let n = code_fields().len();
        let table = with_fields(code_fields()[..n - 2].to_vec());
        let plan = schema_additions(&table, &code).unwrap();
        let names: Vec<&str> = plan.added.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["platform_category", "processed_time"]);
        assert!(plan.foreign.is_empty());
        assert_eq!(
            schema_additions(&code, &code).unwrap(),
            SchemaPlan::default()
        );
    }

    /// An analyst's `ALTER TABLE ADD COLUMNS` (anywhere, any id), on a table of this version
    /// or an older one: accepted, the code's missing columns still added after it.
    #[test]
    fn foreign_optional_columns_are_accepted_and_named() {
        let n = code_fields().len();
        let code = with_fields(code_fields());
        let mut table = code_fields();
        table.push(optional(n as i32 + 1, "analyst_note"));
        let plan = schema_additions(&with_fields(table), &code).unwrap();
        assert!(plan.added.is_empty());
        assert_eq!(plan.foreign, ["analyst_note"]);

        // An older table (last column missing) with a foreign column after its own: the
        // code's column is added (it will get the next id, not the code's).
        let mut older = code_fields()[..n - 1].to_vec();
        older.push(optional(n as i32, "analyst_note"));
        let plan = schema_additions(&with_fields(older), &code).unwrap();
        let names: Vec<&str> = plan.added.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["processed_time"]);
        assert_eq!(plan.foreign, ["analyst_note"]);
    }

    #[test]
    fn every_other_schema_difference_is_refused_with_the_column_named() {
        let n = code_fields().len();
        let code = with_fields(code_fields());
        let refused = |table: Vec<iceberg::spec::NestedField>, words: &[&str]| {
            let message = schema_additions(&with_fields(table), &code).unwrap_err();
            for w in words {
                assert!(message.contains(w), "{w:?} not in {message:?}");
            }
        };
        // A type change.
        let mut retyped = code_fields();
        *retyped[9].field_type =
            iceberg::spec::Type::Primitive(iceberg::spec::PrimitiveType::String);
        refused(retyped, &["bid_price", "type"]);
        // A rename: the code's column is missing before columns the table has.
        let mut renamed = code_fields();
        renamed[1].name = "advert_id".into();
        refused(renamed, &["ad_id", "advert_id", "renaming"]);
        // A removal.
        let mut removed = code_fields();
        removed.remove(3);
        refused(removed, &[code_fields()[3].name.as_str(), "removing"]);
        // Nullability.
        let mut required = code_fields();
        required[1].required = true;
        refused(required, &["ad_id", "nullability"]);
        // A required foreign column: the enricher's rows could not be written.
        let mut foreign_required = code_fields();
        foreign_required.push(iceberg::spec::NestedField::required(
            n as i32 + 1,
            "must_fill",
            iceberg::spec::Type::Primitive(iceberg::spec::PrimitiveType::Long),
        ));
        refused(foreign_required, &["must_fill", "required"]);
        // A new column the code declares required.
        let mut code_required = code_fields();
        code_required[n - 1].required = true;
        let message = schema_additions(
            &with_fields(code_fields()[..n - 1].to_vec()),
            &with_fields(code_required),
        )
        .unwrap_err();
        assert!(message.contains("must be optional"), "{message}");
    }
}
