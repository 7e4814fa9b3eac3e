//! Reading Kinesis shards: a shard iterator, then `GetRecords` page after page. One reader for
//! the tools (the event source mapping runner, redrive, the latency report) and the
//! integration tests.

use aws_sdk_kinesis::types::{Record, ShardIteratorType};
use aws_sdk_kinesis::Client;

use crate::LocalError;

/// Where a read of a shard starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start<'a> {
    /// The oldest record the shard still holds.
    TrimHorizon,
    /// Only records written after the iterator is opened.
    Latest,
    /// At this sequence number (included).
    At(&'a str),
    /// Just after this sequence number.
    After(&'a str),
}

/// One shard, read page by page from a [`Start`].
#[derive(Debug, Clone)]
pub struct ShardReader {
    kinesis: Client,
    /// `None` once the shard is closed and read to its end (or no iterator was given).
    iterator: Option<String>,
    /// Records per `GetRecords` call (the service's default when `None`).
    limit: Option<i32>,
}

impl ShardReader {
    /// Opens a shard iterator on `shard` of `stream` at `start`.
    pub async fn open(
        kinesis: &Client,
        stream: &str,
        shard: &str,
        start: Start<'_>,
        limit: Option<i32>,
    ) -> Result<Self, LocalError> {
        let req = kinesis
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard);
        let req = match start {
            Start::TrimHorizon => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
            Start::Latest => req.shard_iterator_type(ShardIteratorType::Latest),
            Start::At(seq) => req
                .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(seq),
            Start::After(seq) => req
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
        };
        let iterator = req
            .send()
            .await
            .map_err(|e| LocalError::aws("Kinesis GetShardIterator", e))?
            .shard_iterator;
        Ok(ShardReader {
            kinesis: kinesis.clone(),
            iterator,
            limit,
        })
    }

    /// Whether the shard is closed and every record in it was read: no page can come.
    pub fn is_closed(&self) -> bool {
        self.iterator.is_none()
    }

    /// One `GetRecords` call: the next page, possibly empty (nothing new yet). Empty without
    /// a call once [`ShardReader::is_closed`]. After an error the reader stays where it was.
    pub async fn page(&mut self) -> Result<Vec<Record>, LocalError> {
        let Some(it) = self.iterator.clone() else {
            return Ok(Vec::new());
        };
        let page = self
            .kinesis
            .get_records()
            .shard_iterator(it)
            .set_limit(self.limit)
            .send()
            .await
            .map_err(|e| LocalError::aws("Kinesis GetRecords", e))?;
        self.iterator = page.next_shard_iterator;
        Ok(page.records)
    }

    /// The next page with records in it, or `None` once the shard is drained: a page came
    /// back empty (read up to what the shard holds now) or the shard is closed.
    pub async fn next_records(&mut self) -> Result<Option<Vec<Record>>, LocalError> {
        if self.is_closed() {
            return Ok(None);
        }
        let page = self.page().await?;
        Ok((!page.is_empty()).then_some(page))
    }
}

/// The ids of a stream's shards (every page of `ListShards`).
pub async fn shard_ids(kinesis: &Client, stream: &str) -> Result<Vec<String>, LocalError> {
    let mut shards = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let req = kinesis.list_shards();
        let req = match &next {
            Some(token) => req.next_token(token),
            None => req.stream_name(stream),
        };
        let page = req
            .send()
            .await
            .map_err(|e| LocalError::aws("Kinesis ListShards", e))?;
        shards.extend(page.shards().iter().map(|s| s.shard_id().to_owned()));
        match page.next_token() {
            Some(t) => next = Some(t.to_owned()),
            None => return Ok(shards),
        }
    }
}

/// Every record of `stream`, shard by shard, from the trim horizon until the shard is drained
/// ([`ShardReader::next_records`]), each as `each` makes it; `limit` records per call.
pub async fn read_stream<T>(
    kinesis: &Client,
    stream: &str,
    limit: Option<i32>,
    mut each: impl FnMut(Record) -> T,
) -> Result<Vec<T>, LocalError> {
    let mut out = Vec::new();
    for shard in shard_ids(kinesis, stream).await? {
        let mut reader =
            ShardReader::open(kinesis, stream, &shard, Start::TrimHorizon, limit).await?;
        while let Some(page) = reader.next_records().await? {
            out.extend(page.into_iter().map(&mut each));
        }
    }
    Ok(out)
}
