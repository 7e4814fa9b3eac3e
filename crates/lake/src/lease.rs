//! `DynamoDbCommitLease`: one writer at a time per table, in the spirit of Delta Lake's
//! DynamoDB commit coordination. The Glue catalog's optimistic `VersionId` check is the real
//! guard on AWS, but local endpoints do not enforce it, and a lease also saves wasted commit
//! attempts on AWS. A lease expires, so a crashed holder blocks nobody for long.

use std::time::Duration;

use adpipe_aws::error::port_error;
use adpipe_core::ports::PortError;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;

/// A lease table (hash key `pk` S, TTL attribute `ttl`).
#[derive(Debug, Clone)]
pub struct DynamoDbCommitLease {
    client: Client,
    table: String,
    /// How long a holder may keep the lease; longer than any commit takes.
    pub duration: Duration,
    /// How long to wait for the lease before giving up (the batch then fails and is
    /// redelivered). Longer than `duration`: a holder that died mid-commit never releases, and
    /// a waiter that gave up before its lease ran out would fail every writer of the table
    /// until then.
    pub max_wait: Duration,
}

/// A held lease; release it with [`DynamoDbCommitLease::release`].
#[derive(Debug)]
pub struct Lease {
    key: String,
    /// The writer's name and a token of this acquisition: no other acquisition, by this
    /// writer or another, ever holds the same.
    owner: String,
}

/// `owner#<token>`, unique per acquisition in this process and across processes.
fn acquisition_token(owner: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(now_ms());
    h.write_u32(std::process::id());
    format!(
        "{owner}#{:016x}-{}",
        h.finish(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A random duration in `[d/2, d]`.
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(now_ms());
    let half = d / 2;
    half + half.mul_f64((h.finish() % 1_000) as f64 / 1_000.0)
}

impl DynamoDbCommitLease {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoDbCommitLease {
            client,
            table: table.into(),
            duration: Duration::ZERO,
            max_wait: Duration::ZERO,
        }
        .with_duration(Duration::from_secs(60))
    }

    /// This lease with holders keeping it up to `duration`, and waiters waiting a quarter
    /// longer than that (so a holder that died is always outlived).
    pub fn with_duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self.max_wait = duration + duration / 4;
        self
    }

    /// Waits for the lease on `resource` (bounded), then holds it.
    ///
    /// Safe to retry: an attempt whose response was lost (the SDK retries it) finds the lease
    /// held by this very acquisition and takes it, instead of waiting out its own lease.
    pub async fn acquire(&self, resource: &str, owner: &str) -> Result<Lease, PortError> {
        let key = format!("commit-lease#{resource}");
        let owner = acquisition_token(owner);
        let mut delay = Duration::from_millis(20);
        let started = std::time::Instant::now();
        let mut attempts = 0u32;
        loop {
            if attempts > 0 && started.elapsed() >= self.max_wait {
                break;
            }
            attempts += 1;
            let now = now_ms();
            let expires = now + self.duration.as_millis() as i64;
            let result = self
                .client
                .put_item()
                .table_name(&self.table)
                .item("pk", AttributeValue::S(key.clone()))
                .item("owner", AttributeValue::S(owner.clone()))
                .item("expires_at", AttributeValue::N(expires.to_string()))
                .item(
                    "ttl",
                    AttributeValue::N((expires / 1000 + 3600).to_string()),
                )
                .condition_expression("attribute_not_exists(pk) OR expires_at < :now OR #o = :me")
                .expression_attribute_names("#o", "owner")
                .expression_attribute_values(":now", AttributeValue::N(now.to_string()))
                .expression_attribute_values(":me", AttributeValue::S(owner.clone()))
                .send()
                .await;
            match result {
                Ok(_) => return Ok(Lease { key, owner }),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
                {
                    // Full jitter, capped low: a commit holds the lease for a few hundred
                    // milliseconds, and waiters polling in step would take turns unevenly.
                    tokio::time::sleep(jitter(delay)).await;
                    delay = (delay * 2).min(Duration::from_millis(200));
                }
                Err(e) => return Err(port_error("DynamoDB PutItem (commit lease)", e)),
            }
        }
        Err(PortError::Throttled(format!(
            "commit lease on {resource} still held by another writer after {:.1} s \
             ({attempts} attempts)",
            started.elapsed().as_secs_f64()
        )))
    }

    /// Releases a lease this owner holds (a no-op if it expired and someone else holds it).
    pub async fn release(&self, lease: Lease) -> Result<(), PortError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(lease.key))
            .condition_expression("#o = :me")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":me", AttributeValue::S(lease.owner))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(port_error("DynamoDB DeleteItem (commit lease)", e)),
        }
    }
}
