//! The duplicate-key check's scan, planned by the lake itself over a cache of the manifests it
//! has read (`docs/DESIGN.md`, "The lake", exactly-once point 5).
//!
//! iceberg-rust's scan reads every manifest whose partition summary overlaps the filter, on
//! every scan, and its manifest cache lives in one `Table` value, which a commit replaces. At
//! `EnricherParallelizationFactor` above 1 every batch runs the check, so each one read all the
//! manifests of its event hours again: with 32 writers on a table that was most of the S3
//! bytes a commit cost (BENCHMARKS.md, "Lake soak"). A manifest is immutable once written, so
//! the lake keeps what the check needs of each manifest it has read (per live data file: path,
//! size, partition values and the bounds of the two scope columns), keyed by the manifest's
//! path, in a cache bounded in bytes. A check then fetches only the manifests written since
//! this writer's previous check: the newest merged manifest and the few one-commit ones.
//!
//! Pruning is conservative: a manifest or file is skipped only when its partition summary,
//! partition values or column bounds prove that no candidate row can be in it. A partition
//! field on another column, a transform whose result cannot be compared, or a missing bound
//! keeps it. A table with delete manifests (rows deleted by an engine such as Athena) is
//! checked with iceberg-rust's scan instead, which applies the deletes.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use adpipe_core::ports::{LakeTable, PortError};
use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use futures::{StreamExt, TryStreamExt};
use iceberg::arrow::ArrowFileReader;
use iceberg::io::{FileIO, FileMetadata};
use iceberg::spec::{
    DataContentType, Datum, FieldSummary, Literal, ManifestContentType, ManifestFile,
    PartitionSpec, PrimitiveLiteral, Schema, TableMetadata, Transform, Type,
};
use iceberg::table::Table;
use iceberg::transform::create_transform_function;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};

use crate::commit::iceberg_error;
use crate::KeyScope;

/// Bytes of cached manifest entries one writer keeps (estimated, see [`entry_weight`]): about
/// 75,000 data files, some 20 event hours of both tables written by 32 concurrent batches at
/// 60 s windows, where a check needs its own hour's.
pub const MANIFEST_CACHE_BYTES: usize = 32 << 20;

/// Manifests and data files read concurrently by one check.
const CONCURRENCY: usize = 8;

/// Data files up to this size are read in one request; larger ones (compacted files) by the
/// ranges of the two key columns.
const WHOLE_FILE_MAX: u64 = 1 << 20;

/// What the check needs of one live data file.
#[derive(Debug, Clone)]
struct FileEntry {
    path: String,
    size: u64,
    records: u64,
    /// Partition values in the manifest's spec order (`None`: null or not a primitive).
    partition: Vec<Option<PrimitiveLiteral>>,
    campaign: Bounds,
    time: Bounds,
}

type Bounds = (Option<PrimitiveLiteral>, Option<PrimitiveLiteral>);

/// The cache's estimate of an entry's memory: the path, plus the struct (about 190 bytes),
/// its partition values and the bounds' strings on the heap, and the allocator's overhead.
fn entry_weight(e: &FileEntry) -> usize {
    e.path.len() + 320
}

/// The manifests a writer has read, by path, bounded in bytes (oldest evicted first), with
/// counts of fetches and hits.
#[derive(Debug)]
pub struct ManifestCache {
    inner: Mutex<CacheInner>,
    capacity: usize,
    fetched: AtomicU64,
    hits: AtomicU64,
}

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<String, Arc<Vec<FileEntry>>>,
    order: VecDeque<(String, usize)>,
    bytes: usize,
}

/// Manifests fetched from storage and served from the cache, since the writer started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManifestReads {
    pub fetched: u64,
    pub cached: u64,
}

impl ManifestCache {
    pub fn new(capacity: usize) -> Self {
        ManifestCache {
            inner: Mutex::default(),
            capacity,
            fetched: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    pub fn reads(&self) -> ManifestReads {
        ManifestReads {
            fetched: self.fetched.load(AtomicOrdering::Relaxed),
            cached: self.hits.load(AtomicOrdering::Relaxed),
        }
    }

    fn get(&self, path: &str) -> Option<Arc<Vec<FileEntry>>> {
        let found = self
            .inner
            .lock()
            .expect("cache lock")
            .map
            .get(path)
            .cloned();
        if found.is_some() {
            self.hits.fetch_add(1, AtomicOrdering::Relaxed);
        }
        found
    }

    fn insert(&self, path: &str, entries: Arc<Vec<FileEntry>>) {
        let weight = path.len() + entries.iter().map(entry_weight).sum::<usize>();
        let mut inner = self.inner.lock().expect("cache lock");
        if weight > self.capacity || inner.map.contains_key(path) {
            return;
        }
        inner.map.insert(path.to_owned(), entries);
        inner.order.push_back((path.to_owned(), weight));
        inner.bytes += weight;
        while inner.bytes > self.capacity {
            let Some((old, w)) = inner.order.pop_front() else {
                break;
            };
            inner.map.remove(&old);
            inner.bytes -= w;
        }
    }

    async fn entries(
        &self,
        manifest: &ManifestFile,
        file_io: &FileIO,
        columns: (i32, i32),
    ) -> Result<Arc<Vec<FileEntry>>, PortError> {
        if let Some(found) = self.get(&manifest.manifest_path) {
            return Ok(found);
        }
        let loaded = manifest
            .load_manifest(file_io)
            .await
            .map_err(|e| iceberg_error("reading a manifest for the key check", e))?;
        self.fetched.fetch_add(1, AtomicOrdering::Relaxed);
        let bounds = |file: &iceberg::spec::DataFile, id: i32| -> Bounds {
            (
                file.lower_bounds().get(&id).map(|d| d.literal().clone()),
                file.upper_bounds().get(&id).map(|d| d.literal().clone()),
            )
        };
        let entries: Vec<FileEntry> = loaded
            .entries()
            .iter()
            .filter(|e| e.is_alive() && e.content_type() == DataContentType::Data)
            .map(|e| {
                let file = e.data_file();
                FileEntry {
                    path: file.file_path().to_owned(),
                    size: file.file_size_in_bytes(),
                    records: file.record_count(),
                    partition: file
                        .partition()
                        .iter()
                        .map(|v| match v {
                            Some(Literal::Primitive(p)) => Some(p.clone()),
                            _ => None,
                        })
                        .collect(),
                    campaign: bounds(file, columns.0),
                    time: bounds(file, columns.1),
                }
            })
            .collect();
        let entries = Arc::new(entries);
        self.insert(&manifest.manifest_path, entries.clone());
        Ok(entries)
    }
}

/// What a check plans: the data files left after pruning, and the manifests it looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyCheckPlan {
    /// Paths and sizes of the data files the check reads.
    pub files: Vec<(String, u64)>,
    /// The rows those files hold: what the check reads of the key columns (not counted, 0,
    /// for a table with delete files, which iceberg-rust's scan plans).
    pub rows: u64,
    /// Manifests in the snapshot's list, and those whose partition summary let them in.
    pub manifests_listed: u64,
    pub manifests_matched: u64,
}

impl KeyCheckPlan {
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, s)| s).sum()
    }
}

/// The test a partition field puts to a value of its own (a partition value, or a manifest's
/// bound on it).
#[derive(Debug)]
enum FieldTest {
    /// Nothing known: keep.
    Keep,
    /// A monotonic transform of the impression time: the value lies in this range.
    Range(PrimitiveLiteral, PrimitiveLiteral),
    /// A transform of the campaign: the value is one of these.
    OneOf(Vec<PrimitiveLiteral>),
}

fn compare(a: &PrimitiveLiteral, b: &PrimitiveLiteral) -> Option<Ordering> {
    if std::mem::discriminant(a) != std::mem::discriminant(b) {
        return None;
    }
    a.partial_cmp(b)
}

/// Whether `v` may lie in `[lo, hi]`: false only when a comparison proves it does not.
fn within(
    v: &PrimitiveLiteral,
    lo: Option<&PrimitiveLiteral>,
    hi: Option<&PrimitiveLiteral>,
) -> bool {
    let below = lo.is_some_and(|lo| compare(v, lo) == Some(Ordering::Less));
    let above = hi.is_some_and(|hi| compare(v, hi) == Some(Ordering::Greater));
    !(below || above)
}

/// Whether the ranges `[a, b]` and `[lo, hi]` may overlap.
fn overlaps(
    a: &PrimitiveLiteral,
    b: &PrimitiveLiteral,
    lo: Option<&PrimitiveLiteral>,
    hi: Option<&PrimitiveLiteral>,
) -> bool {
    let before = hi.is_some_and(|hi| compare(hi, a) == Some(Ordering::Less));
    let after = lo.is_some_and(|lo| compare(lo, b) == Some(Ordering::Greater));
    !(before || after)
}

impl FieldTest {
    fn value(&self, v: Option<&PrimitiveLiteral>) -> bool {
        let Some(v) = v else { return true };
        match self {
            FieldTest::Keep => true,
            FieldTest::Range(a, b) => within(v, Some(a), Some(b)),
            FieldTest::OneOf(values) => values
                .iter()
                .any(|c| !matches!(compare(v, c), Some(Ordering::Less | Ordering::Greater))),
        }
    }

    fn bounds(&self, lo: Option<&PrimitiveLiteral>, hi: Option<&PrimitiveLiteral>) -> bool {
        match self {
            FieldTest::Keep => true,
            FieldTest::Range(a, b) => overlaps(a, b, lo, hi),
            FieldTest::OneOf(values) => values.iter().any(|c| within(c, lo, hi)),
        }
    }
}

/// The tests of `spec`'s fields for `scope`, and each field's result type.
fn field_tests(
    spec: &PartitionSpec,
    schema: &Schema,
    columns: (i32, i32),
    scope: &KeyScope,
) -> Vec<(FieldTest, Option<iceberg::spec::PrimitiveType>)> {
    spec.fields()
        .iter()
        .map(|field| {
            let result_type = schema
                .field_by_id(field.source_id)
                .and_then(|source| field.transform.result_type(&source.field_type).ok())
                .and_then(|t| match t {
                    Type::Primitive(p) => Some(p),
                    _ => None,
                });
            let Ok(f) = create_transform_function(&field.transform) else {
                return (FieldTest::Keep, result_type);
            };
            let apply = |d: Datum| -> Option<PrimitiveLiteral> {
                f.transform_literal(&d)
                    .ok()
                    .flatten()
                    .map(|d| d.literal().clone())
            };
            let monotonic = matches!(
                field.transform,
                Transform::Identity
                    | Transform::Hour
                    | Transform::Day
                    | Transform::Month
                    | Transform::Year
            );
            let test = if field.source_id == columns.1 && monotonic {
                match (
                    apply(Datum::timestamp_micros(scope.min_time_us)),
                    apply(Datum::timestamp_micros(scope.max_time_us)),
                ) {
                    (Some(a), Some(b)) => FieldTest::Range(a, b),
                    _ => FieldTest::Keep,
                }
            } else if field.source_id == columns.0 {
                let values: Option<Vec<_>> = scope
                    .campaigns
                    .iter()
                    .map(|c| apply(Datum::string(c.as_str())))
                    .collect();
                values.map_or(FieldTest::Keep, FieldTest::OneOf)
            } else {
                FieldTest::Keep
            };
            (test, result_type)
        })
        .collect()
}

/// Whether a manifest's partition summaries let a candidate in.
fn summary_may_match(
    summaries: Option<&[FieldSummary]>,
    tests: &[(FieldTest, Option<iceberg::spec::PrimitiveType>)],
) -> bool {
    let Some(summaries) = summaries else {
        return true;
    };
    tests.iter().zip(summaries).all(|((test, ty), summary)| {
        let Some(ty) = ty else { return true };
        let decode = |b: Option<&[u8]>| {
            b.and_then(|b| Datum::try_from_bytes(b, ty.clone()).ok())
                .map(|d| d.literal().clone())
        };
        let (lo, hi) = (
            decode(summary.lower_bound.as_deref().map(Vec::as_slice)),
            decode(summary.upper_bound.as_deref().map(Vec::as_slice)),
        );
        if lo.is_none() || hi.is_none() {
            // All null, or not recorded: nothing proves the candidates absent.
            return true;
        }
        test.bounds(lo.as_ref(), hi.as_ref())
    })
}

/// The column ids of `campaign_id` and `impression_time` in `schema`.
fn scope_columns(schema: &Schema) -> Result<(i32, i32), PortError> {
    let id = |name: &str| {
        schema
            .field_by_name(name)
            .map(|f| f.id)
            .ok_or_else(|| PortError::Rejected(format!("the table has no {name} column")))
    };
    Ok((id("campaign_id")?, id("impression_time")?))
}

/// The tests of each partition spec's fields for a scope, by spec id.
type SpecTests = HashMap<i32, Vec<(FieldTest, Option<iceberg::spec::PrimitiveType>)>>;

/// Plans the check of rows within `scope` against `table`'s current snapshot; `None` when the
/// table holds delete files (the caller then uses iceberg-rust's scan, which applies them).
pub(crate) async fn plan(
    table: &Table,
    cache: &ManifestCache,
    scope: &KeyScope,
) -> Result<Option<KeyCheckPlan>, PortError> {
    let metadata = table.metadata();
    let Some(snapshot) = metadata.current_snapshot() else {
        return Ok(Some(KeyCheckPlan::default()));
    };
    let columns = scope_columns(metadata.current_schema())?;
    let list = table
        .manifest_list_reader(snapshot)
        .load()
        .await
        .map_err(|e| iceberg_error("reading the manifest list for the key check", e))?
        .consume_entries()
        .into_iter()
        .collect::<Vec<ManifestFile>>();
    if list.iter().any(|m| m.content != ManifestContentType::Data) {
        return Ok(None);
    }
    let (tests, matched) = match_manifests(metadata, &list, columns, scope)?;
    let file_io = table.file_io();
    // Futures made up front, not in a stream closure, so the whole append stays `Send`.
    let loads: Vec<_> = matched
        .iter()
        .map(|m| async move {
            Ok::<_, PortError>((
                m.partition_spec_id,
                cache.entries(m, file_io, columns).await?,
            ))
        })
        .collect();
    let loaded: Vec<(i32, Arc<Vec<FileEntry>>)> = futures::stream::iter(loads)
        .buffered(CONCURRENCY)
        .try_collect()
        .await?;
    let (files, rows) = select_files(&loaded, &tests, scope);
    Ok(Some(KeyCheckPlan {
        files,
        rows,
        manifests_listed: list.len() as u64,
        manifests_matched: matched.len() as u64,
    }))
}

/// The manifests of `list` whose partition summaries let a candidate in, with the field tests
/// of each partition spec they were written with.
fn match_manifests<'a>(
    metadata: &TableMetadata,
    list: &'a [ManifestFile],
    columns: (i32, i32),
    scope: &KeyScope,
) -> Result<(SpecTests, Vec<&'a ManifestFile>), PortError> {
    let schema = metadata.current_schema();
    let mut tests = HashMap::new();
    let mut matched = Vec::new();
    for manifest in list {
        let spec_id = manifest.partition_spec_id;
        let spec_tests = match tests.entry(spec_id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let spec = metadata.partition_spec_by_id(spec_id).ok_or_else(|| {
                    PortError::Rejected(format!(
                        "manifest {} names partition spec {spec_id}, which the table lacks",
                        manifest.manifest_path
                    ))
                })?;
                v.insert(field_tests(spec, schema, columns, scope))
            }
        };
        if summary_may_match(manifest.partitions.as_deref(), spec_tests) {
            matched.push(manifest);
        }
    }
    Ok((tests, matched))
}

/// The data files of the matched manifests' entries that may hold a candidate (by partition
/// values, campaign bounds and time bounds), each once, with the rows they hold.
fn select_files(
    loaded: &[(i32, Arc<Vec<FileEntry>>)],
    tests: &SpecTests,
    scope: &KeyScope,
) -> (Vec<(String, u64)>, u64) {
    let campaigns: Vec<PrimitiveLiteral> = scope
        .campaigns
        .iter()
        .map(|c| PrimitiveLiteral::String(c.clone()))
        .collect();
    let (t0, t1) = (
        PrimitiveLiteral::Long(scope.min_time_us),
        PrimitiveLiteral::Long(scope.max_time_us),
    );
    let mut files = Vec::new();
    let mut rows = 0;
    let mut seen = HashSet::new();
    for (spec_id, entries) in loaded {
        let spec_tests = &tests[spec_id];
        for e in entries.iter() {
            let in_partition = spec_tests
                .iter()
                .zip(&e.partition)
                .all(|((test, _), v)| test.value(v.as_ref()));
            let in_campaigns = campaigns
                .iter()
                .any(|c| within(c, e.campaign.0.as_ref(), e.campaign.1.as_ref()));
            let in_time = overlaps(&t0, &t1, e.time.0.as_ref(), e.time.1.as_ref());
            if in_partition && in_campaigns && in_time && seen.insert(e.path.as_str()) {
                files.push((e.path.clone(), e.size));
                rows += e.records;
            }
        }
    }
    (files, rows)
}

/// The root columns of a Parquet file holding `fields` (by Iceberg field id, else by name).
fn key_columns(
    schema: &parquet::schema::types::SchemaDescriptor,
    fields: &[(i32, &str)],
) -> Result<Vec<usize>, PortError> {
    let roots = schema.root_schema().get_fields();
    fields
        .iter()
        .map(|(id, name)| {
            roots
                .iter()
                .position(|f| f.get_basic_info().has_id() && f.get_basic_info().id() == *id)
                .or_else(|| roots.iter().position(|f| f.name() == *name))
                .ok_or_else(|| PortError::Rejected(format!("a data file has no {name} column")))
        })
        .collect()
}

fn strings(batch: &RecordBatch, i: usize) -> Result<Vec<Option<String>>, PortError> {
    let col = batch.column(i);
    let value = |s: Option<&str>| s.map(str::to_owned);
    Ok(match col.data_type() {
        DataType::Utf8 => col.as_string::<i32>().iter().map(value).collect(),
        DataType::LargeUtf8 => col.as_string::<i64>().iter().map(value).collect(),
        DataType::Utf8View => col.as_string_view().iter().map(value).collect(),
        other => {
            return Err(PortError::Rejected(format!(
                "a key column of a data file is {other}, not a string"
            )))
        }
    })
}

/// The keys among `candidates` held by the data files of `plan`.
pub(crate) async fn read_keys(
    table: &Table,
    lake_table: LakeTable,
    plan: &KeyCheckPlan,
    candidates: &HashSet<(String, String)>,
) -> Result<HashSet<(String, String)>, PortError> {
    let schema = table.metadata().current_schema();
    let id = |name: &'static str| -> Result<(i32, &'static str), PortError> {
        Ok((
            schema
                .field_by_name(name)
                .map(|f| f.id)
                .ok_or_else(|| PortError::Rejected(format!("the table has no {name} column")))?,
            name,
        ))
    };
    let fields = match lake_table {
        LakeTable::Clicks => vec![id("impression_id")?, id("click_id")?],
        LakeTable::Impressions => vec![id("impression_id")?],
    };
    let file_io = table.file_io();
    let reads: Vec<_> = plan
        .files
        .iter()
        .map(|(path, size)| {
            let fields = &fields;
            async move {
                let batches = read_file(file_io, path, *size, fields).await?;
                let mut hits = Vec::new();
                for batch in &batches {
                    let ids = strings(batch, 0)?;
                    let clicks = if fields.len() > 1 {
                        strings(batch, 1)?
                    } else {
                        vec![None; ids.len()]
                    };
                    for (i, c) in ids.into_iter().zip(clicks) {
                        let key = (i.unwrap_or_default(), c.unwrap_or_default());
                        if candidates.contains(&key) {
                            hits.push(key);
                        }
                    }
                }
                Ok::<_, PortError>(hits)
            }
        })
        .collect();
    let found: Vec<Vec<(String, String)>> = futures::stream::iter(reads)
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    Ok(found.into_iter().flatten().collect())
}

/// The key columns of one data file, in `fields`' order.
async fn read_file(
    file_io: &FileIO,
    path: &str,
    size: u64,
    fields: &[(i32, &str)],
) -> Result<Vec<RecordBatch>, PortError> {
    let read_err = |e: iceberg::Error| iceberg_error("reading a data file for the key check", e);
    let parquet_err =
        |e: parquet::errors::ParquetError| PortError::Rejected(format!("reading {path}: {e}"));
    let input = file_io.new_input(path).map_err(read_err)?;
    let mut batches = Vec::new();
    if size <= WHOLE_FILE_MAX {
        let bytes = input.read().await.map_err(read_err)?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(parquet_err)?;
        let columns = key_columns(builder.parquet_schema(), fields)?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), columns.iter().copied());
        let reader = builder.with_projection(mask).build().map_err(parquet_err)?;
        for batch in reader {
            batches.push(reorder(
                batch.map_err(|e| PortError::Rejected(format!("reading {path}: {e}")))?,
                &columns,
            ));
        }
    } else {
        let reader = ArrowFileReader::new(
            FileMetadata { size },
            Box::new(input.reader().await.map_err(read_err)?),
        );
        let builder = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .map_err(parquet_err)?;
        let columns = key_columns(builder.parquet_schema(), fields)?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), columns.iter().copied());
        let stream = builder.with_projection(mask).build().map_err(parquet_err)?;
        for batch in stream.try_collect::<Vec<_>>().await.map_err(parquet_err)? {
            batches.push(reorder(batch, &columns));
        }
    }
    Ok(batches)
}

/// A projected batch's columns come in file order; put them in the order asked for.
fn reorder(batch: RecordBatch, columns: &[usize]) -> RecordBatch {
    let mut sorted: Vec<usize> = columns.to_vec();
    sorted.sort_unstable();
    let order: Vec<usize> = columns
        .iter()
        .map(|c| {
            sorted
                .iter()
                .position(|s| s == c)
                .expect("projected column")
        })
        .collect();
    batch.project(&order).expect("projected columns exist")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> PrimitiveLiteral {
        PrimitiveLiteral::String(v.into())
    }

    #[test]
    fn a_value_is_pruned_only_when_a_bound_proves_it_outside() {
        assert!(within(&s("b"), Some(&s("a")), Some(&s("c"))));
        assert!(within(&s("a"), Some(&s("a")), Some(&s("a"))));
        assert!(!within(&s("d"), Some(&s("a")), Some(&s("c"))));
        assert!(!within(&s("0"), Some(&s("a")), Some(&s("c"))));
        // Missing or incomparable bounds keep it.
        assert!(within(&s("d"), None, None));
        assert!(within(
            &s("d"),
            Some(&PrimitiveLiteral::Int(1)),
            Some(&PrimitiveLiteral::Int(2))
        ));
        let (a, b) = (PrimitiveLiteral::Long(10), PrimitiveLiteral::Long(20));
        assert!(overlaps(
            &a,
            &b,
            Some(&PrimitiveLiteral::Long(20)),
            Some(&PrimitiveLiteral::Long(30))
        ));
        assert!(overlaps(
            &a,
            &b,
            Some(&PrimitiveLiteral::Long(0)),
            Some(&PrimitiveLiteral::Long(10))
        ));
        assert!(!overlaps(&a, &b, Some(&PrimitiveLiteral::Long(21)), None));
        assert!(!overlaps(&a, &b, None, Some(&PrimitiveLiteral::Long(9))));
    }

    #[test]
    fn the_cache_stays_within_its_bytes_evicting_the_oldest() {
        let entry = |path: &str| FileEntry {
            path: path.into(),
            size: 1,
            records: 1,
            partition: vec![],
            campaign: (None, None),
            time: (None, None),
        };
        let manifest =
            |n: usize| Arc::new((0..n).map(|i| entry(&format!("f{i}"))).collect::<Vec<_>>());
        let one = "m1".len() + entry_weight(&entry("f0")) * 10;
        let cache = ManifestCache::new(one * 2);
        cache.insert("m1", manifest(10));
        cache.insert("m2", manifest(10));
        assert!(cache.get("m1").is_some() && cache.get("m2").is_some());
        cache.insert("m3", manifest(10));
        assert!(cache.get("m1").is_none(), "the oldest went");
        assert!(cache.get("m2").is_some() && cache.get("m3").is_some());
        assert!(cache.inner.lock().unwrap().bytes <= one * 2);
        // A manifest larger than the whole cache is not kept (and evicts nothing).
        cache.insert("big", manifest(30));
        assert!(cache.get("big").is_none() && cache.get("m3").is_some());
        assert_eq!(
            cache.reads(),
            ManifestReads {
                fetched: 0,
                cached: 5
            }
        );
    }

    #[test]
    fn hour_and_campaign_fields_test_partition_values_and_summaries() {
        use iceberg::spec::{NestedField, PrimitiveType, UnboundPartitionSpec};
        let schema = Schema::builder()
            .with_fields(vec![
                NestedField::required(1, "campaign_id", Type::Primitive(PrimitiveType::String))
                    .into(),
                NestedField::required(
                    2,
                    "impression_time",
                    Type::Primitive(PrimitiveType::Timestamp),
                )
                .into(),
            ])
            .build()
            .unwrap();
        let spec = UnboundPartitionSpec::builder()
            .add_partition_field(2, "hour", Transform::Hour)
            .unwrap()
            .add_partition_field(1, "campaign", Transform::Identity)
            .unwrap()
            .add_partition_field(1, "bucket", Transform::Bucket(4))
            .unwrap()
            .build()
            .bind(schema.clone())
            .unwrap();
        const HOUR_US: i64 = 3_600_000_000;
        let scope = KeyScope {
            campaigns: ["c-2".to_owned(), "c-5".to_owned()].into(),
            min_time_us: 10 * HOUR_US + 5,
            max_time_us: 11 * HOUR_US + 7,
        };
        let tests = field_tests(&spec, &schema, (1, 2), &scope);
        let (hour, campaign, bucket) = (&tests[0].0, &tests[1].0, &tests[2].0);
        assert!(hour.value(Some(&PrimitiveLiteral::Int(10))));
        assert!(hour.value(Some(&PrimitiveLiteral::Int(11))));
        assert!(!hour.value(Some(&PrimitiveLiteral::Int(9))));
        assert!(!hour.value(Some(&PrimitiveLiteral::Int(12))));
        assert!(hour.value(None), "a null partition value is kept");
        assert!(hour.bounds(
            Some(&PrimitiveLiteral::Int(0)),
            Some(&PrimitiveLiteral::Int(10))
        ));
        assert!(!hour.bounds(
            Some(&PrimitiveLiteral::Int(12)),
            Some(&PrimitiveLiteral::Int(20))
        ));
        assert!(campaign.value(Some(&s("c-5"))));
        assert!(!campaign.value(Some(&s("c-3"))));
        assert!(campaign.bounds(Some(&s("c-3")), Some(&s("c-9"))));
        assert!(!campaign.bounds(Some(&s("c-3")), Some(&s("c-4"))));
        // A bucket is matched by equality with the candidates' buckets.
        let f = create_transform_function(&Transform::Bucket(4)).unwrap();
        let b2 = f.transform_literal(&Datum::string("c-2")).unwrap().unwrap();
        assert!(bucket.value(Some(b2.literal())));
        // The summary bytes decode with the field's result type.
        let summary = |lo: i32, hi: i32| FieldSummary {
            contains_null: false,
            contains_nan: None,
            lower_bound: Some(Datum::int(lo).to_bytes().unwrap()),
            upper_bound: Some(Datum::int(hi).to_bytes().unwrap()),
        };
        let no_bounds = FieldSummary::default();
        let only_hours = &tests[..1];
        assert!(summary_may_match(Some(&[summary(8, 10)]), only_hours));
        assert!(!summary_may_match(Some(&[summary(12, 14)]), only_hours));
        assert!(summary_may_match(Some(&[no_bounds]), only_hours));
        assert!(summary_may_match(None, only_hours));
    }
}
