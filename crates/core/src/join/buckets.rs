//! State buckets: an `impression_id` maps to one of [`HASH_BUCKETS`] fixed buckets by its
//! SHA-256, each bucket to one slice of Kinesis' 128-bit hash space, so a whole bucket lives
//! on exactly one keyed-stream shard whatever the shard count, and a shard owns a contiguous
//! [`BucketRange`]. The join state is keyed by that range, never by a shard id, so it outlives
//! resharding.

use serde::{Deserialize, Serialize};

/// Bits of the fixed bucket space.
pub const BUCKET_BITS: u32 = 6;

/// The fixed number of state buckets (64). More shards than buckets would leave shards idle,
/// so this is also the largest useful shard count of the keyed stream (64 shards take about
/// 64 MB/s of keyed records, several hundred thousand events a second). Few buckets let the
/// router pack many events into one keyed record: a batch of 500 input records makes about
/// 64 keyed records, not 500, which is what Kinesis bills (PUT payload units) and what the
/// joiner's batch size counts.
pub const HASH_BUCKETS: u32 = 1 << BUCKET_BITS;

/// The bucket of an impression id: the top [`BUCKET_BITS`] bits of its SHA-256.
pub fn bucket_of(impression_id: &str) -> u32 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(impression_id.as_bytes());
    (u32::from(d[0]) << 8 | u32::from(d[1])) >> (16 - BUCKET_BITS)
}

/// The `ExplicitHashKey` of a bucket: the middle of its slice of the 128-bit hash space.
pub fn explicit_hash_key(bucket: u32) -> String {
    let mid = (2 * u128::from(bucket) + 1) << (128 - BUCKET_BITS - 1);
    mid.to_string()
}

/// The buckets a shard owns: those whose explicit hash key lies in the shard's hash key range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BucketRange {
    pub lo: u32,
    pub hi: u32,
}

impl BucketRange {
    /// Every bucket (a stream with one shard).
    pub const ALL: BucketRange = BucketRange {
        lo: 0,
        hi: HASH_BUCKETS - 1,
    };

    /// From a shard's `HashKeyRange` (decimal strings). `None` if no bucket's key falls in it.
    pub fn from_hash_range(start: &str, end: &str) -> Option<BucketRange> {
        let start: u128 = start.trim().parse().ok()?;
        let end: u128 = end.trim().parse().ok()?;
        let key = |b: u32| (2 * u128::from(b) + 1) << (128 - BUCKET_BITS - 1);
        let buckets: Vec<u32> = (0..HASH_BUCKETS)
            .filter(|&b| (start..=end).contains(&key(b)))
            .collect();
        Some(BucketRange {
            lo: *buckets.first()?,
            hi: *buckets.last()?,
        })
    }

    pub fn contains(&self, bucket: u32) -> bool {
        (self.lo..=self.hi).contains(&bucket)
    }

    pub fn overlaps(&self, other: &BucketRange) -> bool {
        self.lo <= other.hi && other.lo <= self.hi
    }

    /// The id of the state log of this range (`r0000-0063`).
    pub fn log_id(&self) -> String {
        format!("r{:04}-{:04}", self.lo, self.hi)
    }

    /// The range a log id names.
    pub fn from_log_id(id: &str) -> Option<BucketRange> {
        let (lo, hi) = id.strip_prefix('r')?.split_once('-')?;
        let (lo, hi) = (lo.parse().ok()?, hi.parse().ok()?);
        (lo <= hi && hi < HASH_BUCKETS).then_some(BucketRange { lo, hi })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bucket_key_lies_in_its_own_slice_and_ranges_round_trip() {
        let max = u128::MAX.to_string();
        assert_eq!(
            BucketRange::from_hash_range("0", &max),
            Some(BucketRange::ALL)
        );
        // Two shards split at the middle, as Kinesis' even split does.
        let mid = 1u128 << 127;
        let low = BucketRange::from_hash_range("0", &(mid - 1).to_string()).unwrap();
        let high = BucketRange::from_hash_range(&mid.to_string(), &max).unwrap();
        let half = HASH_BUCKETS / 2;
        assert_eq!(
            (low.lo, low.hi, high.lo, high.hi),
            (0, half - 1, half, HASH_BUCKETS - 1)
        );
        assert!(!low.overlaps(&high) && low.overlaps(&BucketRange::ALL));
        // Three shards: uneven boundaries still give each bucket exactly one owner.
        let third = u128::MAX / 3;
        let ranges = [
            BucketRange::from_hash_range("0", &third.to_string()).unwrap(),
            BucketRange::from_hash_range(&(third + 1).to_string(), &(2 * third).to_string())
                .unwrap(),
            BucketRange::from_hash_range(&(2 * third + 1).to_string(), &max).unwrap(),
        ];
        for b in 0..HASH_BUCKETS {
            assert_eq!(ranges.iter().filter(|r| r.contains(b)).count(), 1, "{b}");
        }
        for r in ranges {
            assert_eq!(BucketRange::from_log_id(&r.log_id()), Some(r));
        }
        assert_eq!(BucketRange::from_hash_range("5", "6"), None);
    }
}
