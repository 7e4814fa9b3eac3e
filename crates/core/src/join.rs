//! The join rule and the join decisions: what an arriving impression or click does, given the
//! join-state item as it was just before the arrival's own atomic write.
//!
//! State model (one item per `impression_id`, see `docs/DESIGN.md`): the impression if it has
//! arrived, every click that has arrived for that impression id, each side with its arrival
//! (processing) time and the digest of the Kinesis position that wrote it, the order in which
//! the sides were written, and an `emitted` flag per click once its joined record is on the
//! output stream. Each arrival writes itself with "put if absent" semantics and gets the item
//! as it was before that write, in one atomic request; so of two partners exactly one sees the
//! other and *decides* the pair, whatever the interleaving or concurrency.
//!
//! Only the decider emits a pair, and a pair it decided but could not emit is completed by the
//! decider's own redelivery (Lambda retries that record). Any other redelivery leaves a pending
//! pair alone until the recovery lease has passed, so it cannot race an invocation still busy
//! with that pair.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Click, Impression, ImpressionRecord, JoinedRecord};

/// The join contract's tunables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinRules {
    /// Largest |click.event_time − impression.event_time| that still joins, inclusive.
    pub window_ms: i64,
    /// How long (processing time) one side waits for its partner. Past it the state is treated
    /// as absent even if DynamoDB's lazy TTL has not deleted it yet.
    pub retention_ms: i64,
    /// How long a decided-but-unemitted pair belongs to its decider alone. After it, any
    /// delivery of either partner may complete the pair (for records Lambda gave up on and an
    /// operator replays). At least the function's timeout.
    pub recovery_lease_ms: i64,
}

impl Default for JoinRules {
    fn default() -> Self {
        JoinRules {
            window_ms: 30_000,
            retention_ms: 24 * 3600 * 1000,
            recovery_lease_ms: 15 * 60 * 1000,
        }
    }
}

/// Most clicks one impression id holds in the join state. A new click past it is refused
/// ([`Arrival::TooManyClicks`], dead-lettered as `too_many_clicks`) and nothing is written.
/// With the field limits of [`crate::validate`] this keeps every state item below DynamoDB's
/// 400 KB item limit whatever the input (the AWS adapter's tests build the largest possible
/// item and measure it); real traffic has one or two clicks per impression.
pub const MAX_CLICKS_PER_IMPRESSION: usize = 32;

/// The write-order token of the impression side.
pub const IMPRESSION_TOKEN: &str = "i";

/// The write-order token of a click side.
pub fn click_token(click_id: &str) -> String {
    format!("c:{click_id}")
}

/// **The join rule.** A click is attributed to an impression iff both ids agree and their event
/// times are at most `window_ms` apart, both ends inclusive, at millisecond precision.
pub fn attributes(rules: &JoinRules, imp: &Impression, click: &Click) -> bool {
    imp.impression_id == click.impression_id
        && imp.ad_id == click.ad_id
        && (click.event_time_ms - imp.event_time_ms).abs() <= rules.window_ms
}

/// The impression side of a join-state item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredImpression {
    pub impression: Impression,
    pub arrived_at_ms: i64,
    /// [`crate::model::SourcePosition::key`] of the record that wrote it.
    #[serde(default)]
    pub source: String,
}

/// One click of a join-state item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredClick {
    pub click: Click,
    pub arrived_at_ms: i64,
    /// [`crate::model::SourcePosition::key`] of the record that wrote it.
    #[serde(default)]
    pub source: String,
    /// Set after its joined record was accepted by the output stream.
    #[serde(default)]
    pub emitted: bool,
}

/// A join-state item: everything known about one `impression_id`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JoinItem {
    pub impression: Option<StoredImpression>,
    pub clicks: BTreeMap<String, StoredClick>,
    /// Write-order tokens ([`IMPRESSION_TOKEN`], [`click_token`]), one per write, in the order
    /// the store applied them; redeliveries append again, so first occurrences count.
    pub order: Vec<String>,
}

impl JoinItem {
    /// The stored side that was written second, i.e. that decided the pair, if known.
    fn decider<'a>(
        &self,
        imp: &'a StoredImpression,
        click: &'a StoredClick,
    ) -> Option<(&'a str, i64)> {
        let first = |token: &str| self.order.iter().position(|t| t == token);
        let imp_at = first(IMPRESSION_TOKEN)?;
        let click_at = first(&click_token(&click.click.click_id))?;
        Some(if imp_at > click_at {
            (imp.source.as_str(), imp.arrived_at_ms)
        } else {
            (click.source.as_str(), click.arrived_at_ms)
        })
    }
}

/// The arrival being decided: which record it is and when it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Arriving<'a> {
    /// [`crate::model::SourcePosition::key`] of the arriving record.
    pub source: &'a str,
    pub now_ms: i64,
}

/// Whether an arrival was new or a redelivery of something already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// First time this impression id / click id was seen; it is now stored.
    New,
    /// Already stored with identical content: Kinesis or Lambda redelivered it.
    Duplicate,
    /// Already stored with different content (a producer reused an id). Nothing was
    /// overwritten; the arrival goes to the dead-letter destination.
    Conflicting,
    /// A new click for an impression id that already holds [`MAX_CLICKS_PER_IMPRESSION`]
    /// clicks. Nothing was written; the arrival goes to the dead-letter destination.
    TooManyClicks,
}

/// A pair whose partners met only after the earlier one's retention had run out.
#[derive(Debug, Clone, PartialEq)]
pub struct LatePair {
    pub impression: Impression,
    pub click: Click,
    /// Milliseconds between the two arrivals (greater than the retention).
    pub arrival_gap_ms: i64,
}

/// What one arrival leads to.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub arrival: Arrival,
    /// Joined records this arrival must (re-)emit: new pairs, and pairs a failed earlier
    /// attempt decided but never got onto the output stream.
    pub pairs: Vec<JoinedRecord>,
    /// Pairs that would join but met after the retention: recorded, never emitted.
    pub late: Vec<LatePair>,
    /// A new arrival that found no partner and now waits in the state.
    pub buffered: bool,
    /// Stored partners with the same impression id that do not join (other `ad_id`, or event
    /// times outside the window).
    pub unmatched: u32,
    /// Pending pairs this redelivery left to their decider (still within the recovery lease).
    pub deferred: u32,
    /// The impression to forward to the lake: a first-seen impression, or (flagged recovered)
    /// the impression's own record coming back, whose first forward may not have happened.
    pub forward: Option<ImpressionRecord>,
}

impl Decision {
    fn new(arrival: Arrival) -> Self {
        Decision {
            arrival,
            pairs: Vec::new(),
            late: Vec::new(),
            buffered: false,
            unmatched: 0,
            deferred: 0,
            forward: None,
        }
    }
}

/// Where a candidate pair stands, from the stored state alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PairStatus {
    /// The click is not attributed to this impression.
    NoJoin,
    /// Joins, and the partners met within the retention.
    Joins,
    /// Joins by the rule, but the later partner arrived after the earlier one expired.
    Late,
}

fn pair_status(rules: &JoinRules, imp: &StoredImpression, click: &StoredClick) -> PairStatus {
    if !attributes(rules, &imp.impression, &click.click) {
        PairStatus::NoJoin
    } else if arrival_gap(imp, click) > rules.retention_ms {
        PairStatus::Late
    } else {
        PairStatus::Joins
    }
}

fn arrival_gap(imp: &StoredImpression, click: &StoredClick) -> i64 {
    (imp.arrived_at_ms - click.arrived_at_ms).abs()
}

/// May this arrival emit the pair? A new arrival that found its partner is the decider. A
/// redelivery may complete a pending pair only if it is the decider's own record coming back,
/// or once the lease has passed.
fn may_emit(
    rules: &JoinRules,
    d: &Decision,
    before: &JoinItem,
    imp: &StoredImpression,
    click: &StoredClick,
    at: Arriving<'_>,
) -> bool {
    if d.arrival == Arrival::New {
        return true;
    }
    match before.decider(imp, click) {
        Some((source, arrived)) => {
            source == at.source || at.now_ms - arrived > rules.recovery_lease_ms
        }
        None => at.now_ms - imp.arrived_at_ms.max(click.arrived_at_ms) > rules.recovery_lease_ms,
    }
}

fn push_pair(
    d: &mut Decision,
    rules: &JoinRules,
    before: &JoinItem,
    imp: &StoredImpression,
    click: &StoredClick,
    at: Arriving<'_>,
) {
    match pair_status(rules, imp, click) {
        PairStatus::NoJoin => d.unmatched += 1,
        PairStatus::Joins if click.emitted => {}
        PairStatus::Joins if !may_emit(rules, d, before, imp, click, at) => d.deferred += 1,
        PairStatus::Joins => {
            let mut pair = JoinedRecord::new(&imp.impression, &click.click);
            pair.recovered = d.arrival != Arrival::New;
            d.pairs.push(pair);
        }
        PairStatus::Late => d.late.push(LatePair {
            impression: imp.impression.clone(),
            click: click.click.clone(),
            arrival_gap_ms: arrival_gap(imp, click),
        }),
    }
}

/// An impression arrived; `before` is the item as it was before its write.
///
/// New: every stored click is judged against it. Duplicate: stored pairs not yet emitted are
/// completed if this arrival may (see the module docs).
pub fn decide_impression(
    rules: &JoinRules,
    before: &JoinItem,
    imp: &Impression,
    at: Arriving<'_>,
) -> Decision {
    let (mut d, stored) = match &before.impression {
        Some(stored) if stored.impression == *imp => {
            (Decision::new(Arrival::Duplicate), stored.clone())
        }
        Some(_) => return Decision::new(Arrival::Conflicting),
        None => (
            Decision::new(Arrival::New),
            StoredImpression {
                impression: imp.clone(),
                arrived_at_ms: at.now_ms,
                source: at.source.to_owned(),
            },
        ),
    };
    for click in before.clicks.values() {
        push_pair(&mut d, rules, before, &stored, click, at);
    }
    // Impressions carry no emitted mark (it would double the writes per event): the first
    // sighting forwards it, and only its own record's redelivery, or any delivery after the
    // lease, forwards it again, flagged so the lake checks before landing it.
    d.forward = match d.arrival {
        Arrival::New => Some(ImpressionRecord::new(imp, false)),
        _ if stored.source == at.source
            || at.now_ms - stored.arrived_at_ms > rules.recovery_lease_ms =>
        {
            Some(ImpressionRecord::new(&stored.impression, true))
        }
        _ => None,
    };
    d.buffered = d.arrival == Arrival::New && before.clicks.is_empty();
    d
}

/// A click arrived; `before` is the item as it was before its write.
pub fn decide_click(
    rules: &JoinRules,
    before: &JoinItem,
    click: &Click,
    at: Arriving<'_>,
) -> Decision {
    let (mut d, stored) = match before.clicks.get(&click.click_id) {
        Some(stored) if stored.click == *click => {
            (Decision::new(Arrival::Duplicate), stored.clone())
        }
        Some(_) => return Decision::new(Arrival::Conflicting),
        None if before.clicks.len() >= MAX_CLICKS_PER_IMPRESSION => {
            return Decision::new(Arrival::TooManyClicks)
        }
        None => (
            Decision::new(Arrival::New),
            StoredClick {
                click: click.clone(),
                arrived_at_ms: at.now_ms,
                source: at.source.to_owned(),
                emitted: false,
            },
        ),
    };
    match &before.impression {
        Some(imp) => push_pair(&mut d, rules, before, imp, &stored, at),
        None => d.buffered = d.arrival == Arrival::New,
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_169_730_000;

    fn imp(id: &str, ad: &str, t: i64) -> Impression {
        Impression {
            ad_id: ad.into(),
            impression_id: id.into(),
            campaign_id: "camp".into(),
            publisher_id: "pub".into(),
            event_time_ms: t,
            device_type: "mobile".into(),
            geo_location: "US".into(),
            platform: "ios".into(),
            ad_type: "banner".into(),
            bid_price: 60.0,
        }
    }

    fn click(id: &str, imp_id: &str, ad: &str, t: i64) -> Click {
        Click {
            ad_id: ad.into(),
            impression_id: imp_id.into(),
            campaign_id: "camp".into(),
            publisher_id: "pub".into(),
            event_time_ms: t,
            device_type: "mobile".into(),
            geo_location: "US".into(),
            platform: "ios".into(),
            click_price: 1.0,
            click_id: id.into(),
            click_id_derived: false,
        }
    }

    /// A fresh delivery (a record no stored side came from) at `now`.
    fn at(now: i64) -> Arriving<'static> {
        Arriving {
            source: "another-record",
            now_ms: now,
        }
    }

    /// The delivery of the record at position `source`, at `now`.
    fn from(source: &str, now: i64) -> Arriving<'_> {
        Arriving {
            source,
            now_ms: now,
        }
    }

    /// Stores the impression as written next, by record `imp-src`.
    fn store_impression(item: &mut JoinItem, i: &Impression, arrived: i64) {
        item.impression = Some(StoredImpression {
            impression: i.clone(),
            arrived_at_ms: arrived,
            source: "imp-src".into(),
        });
        item.order.push(IMPRESSION_TOKEN.into());
    }

    /// Stores the click as written next, by record `<click_id>-src`.
    fn store_click(item: &mut JoinItem, c: &Click, arrived: i64, emitted: bool) {
        item.clicks.insert(
            c.click_id.clone(),
            StoredClick {
                click: c.clone(),
                arrived_at_ms: arrived,
                source: format!("{}-src", c.click_id),
                emitted,
            },
        );
        item.order.push(click_token(&c.click_id));
    }

    fn with_impression(i: &Impression, arrived: i64) -> JoinItem {
        let mut item = JoinItem::default();
        store_impression(&mut item, i, arrived);
        item
    }

    #[test]
    fn window_edges_are_inclusive_at_thirty_seconds() {
        let r = JoinRules::default();
        let i = imp("i", "a", T0);
        assert!(attributes(&r, &i, &click("c", "i", "a", T0 + 30_000)));
        assert!(attributes(&r, &i, &click("c", "i", "a", T0 - 30_000)));
        assert!(!attributes(&r, &i, &click("c", "i", "a", T0 + 30_001)));
        assert!(!attributes(&r, &i, &click("c", "i", "a", T0 - 30_001)));
    }

    #[test]
    fn click_before_impression_in_event_time_joins() {
        let r = JoinRules::default();
        assert!(attributes(
            &r,
            &imp("i", "a", T0),
            &click("c", "i", "a", T0 - 1)
        ));
    }

    #[test]
    fn ad_id_mismatch_does_not_join() {
        let r = JoinRules::default();
        assert!(!attributes(
            &r,
            &imp("i", "a", T0),
            &click("c", "i", "b", T0)
        ));
    }

    #[test]
    fn window_is_configurable() {
        let r = JoinRules {
            window_ms: 5_000,
            ..JoinRules::default()
        };
        assert!(attributes(
            &r,
            &imp("i", "a", T0),
            &click("c", "i", "a", T0 + 5_000)
        ));
        assert!(!attributes(
            &r,
            &imp("i", "a", T0),
            &click("c", "i", "a", T0 + 5_001)
        ));
    }

    #[test]
    fn click_after_impression_joins_on_arrival() {
        let r = JoinRules::default();
        let before = with_impression(&imp("i", "a", T0), 100);
        let d = decide_click(&r, &before, &click("c", "i", "a", T0 + 10), at(200));
        assert_eq!(d.arrival, Arrival::New);
        assert_eq!(d.pairs.len(), 1);
        assert_eq!(d.pairs[0].pair_key(), ("i", "c"));
        assert!(!d.buffered);
    }

    #[test]
    fn click_before_impression_is_buffered_then_joins_when_impression_arrives() {
        let r = JoinRules::default();
        let c = click("c", "i", "a", T0 + 10);
        let d = decide_click(&r, &JoinItem::default(), &c, at(100));
        assert!(d.buffered && d.pairs.is_empty());

        let mut before = JoinItem::default();
        store_click(&mut before, &c, 100, false);
        let d = decide_impression(&r, &before, &imp("i", "a", T0), at(200));
        assert_eq!(d.arrival, Arrival::New);
        assert_eq!(d.pairs.len(), 1);
        assert!(!d.buffered);
    }

    #[test]
    fn several_clicks_on_one_impression_are_several_pairs() {
        let r = JoinRules::default();
        let mut before = JoinItem::default();
        store_click(&mut before, &click("c1", "i", "a", T0 + 1), 100, false);
        store_click(&mut before, &click("c2", "i", "a", T0 + 2), 100, false);
        store_click(&mut before, &click("c3", "i", "b", T0 + 3), 100, false);
        store_click(&mut before, &click("c4", "i", "a", T0 + 40_000), 100, false);
        let d = decide_impression(&r, &before, &imp("i", "a", T0), at(200));
        let keys: Vec<_> = d.pairs.iter().map(|p| p.click_id.as_str()).collect();
        assert_eq!(keys, ["c1", "c2"]);
        assert_eq!(d.unmatched, 2);
    }

    #[test]
    fn deciders_own_redelivery_completes_its_pending_pair() {
        let r = JoinRules::default();
        let c = click("c", "i", "a", T0);
        // The click was written after the impression: it decided the pair, then failed to emit.
        let mut before = with_impression(&imp("i", "a", T0), 100);
        store_click(&mut before, &c, 150, false);
        let d = decide_click(&r, &before, &c, from("c-src", 300));
        assert_eq!(d.arrival, Arrival::Duplicate);
        assert_eq!(
            d.pairs.len(),
            1,
            "Lambda's retry of the decider completes the pair"
        );
        assert_eq!(d.deferred, 0);
    }

    #[test]
    fn other_deliveries_leave_a_pending_pair_to_its_decider_until_the_lease_passes() {
        let r = JoinRules::default();
        let i = imp("i", "a", T0);
        let c = click("c", "i", "a", T0);
        let mut before = with_impression(&i, 100);
        store_click(&mut before, &c, 150, false);
        // A producer duplicate of the click, and the impression's own redelivery: not the decider.
        for d in [
            decide_click(&r, &before, &c, at(300)),
            decide_impression(&r, &before, &i, from("imp-src", 300)),
        ] {
            assert_eq!(d.arrival, Arrival::Duplicate);
            assert!(d.pairs.is_empty(), "the decider may still be emitting it");
            assert_eq!(d.deferred, 1);
        }
        // Past the lease, any delivery completes it (the decider's record was given up on).
        let late = 150 + r.recovery_lease_ms + 1;
        assert_eq!(decide_click(&r, &before, &c, at(late)).pairs.len(), 1);
        assert_eq!(decide_impression(&r, &before, &i, at(late)).pairs.len(), 1);
    }

    #[test]
    fn the_decider_is_the_second_write_whatever_the_arrival_clocks_say() {
        let r = JoinRules::default();
        let i = imp("i", "a", T0);
        let c = click("c", "i", "a", T0);
        // The click was written first but its invocation's clock read later (batch start skew).
        let mut before = JoinItem::default();
        store_click(&mut before, &c, 900, false);
        store_impression(&mut before, &i, 100);
        let d = decide_impression(&r, &before, &i, from("imp-src", 1_000));
        assert_eq!(
            d.pairs.len(),
            1,
            "the impression wrote second: its retry completes the pair"
        );
        let d = decide_click(&r, &before, &c, from("c-src", 1_000));
        assert!(d.pairs.is_empty());
    }

    #[test]
    fn an_emitted_pair_is_never_emitted_again() {
        let r = JoinRules::default();
        let i = imp("i", "a", T0);
        let c = click("c", "i", "a", T0);
        let mut before = with_impression(&i, 100);
        store_click(&mut before, &c, 150, true);
        let late = 150 + r.recovery_lease_ms + 1;
        for d in [
            decide_click(&r, &before, &c, from("c-src", 300)),
            decide_click(&r, &before, &c, at(late)),
            decide_impression(&r, &before, &i, at(late)),
        ] {
            assert_eq!(d.arrival, Arrival::Duplicate);
            assert!(d.pairs.is_empty() && d.deferred == 0);
        }
    }

    #[test]
    fn redelivered_impression_completes_pending_pairs_it_decided_only() {
        let r = JoinRules::default();
        let i = imp("i", "a", T0);
        let mut before = JoinItem::default();
        store_click(&mut before, &click("done", "i", "a", T0), 50, true);
        store_click(&mut before, &click("pending", "i", "a", T0), 50, false);
        store_impression(&mut before, &i, 100);
        let d = decide_impression(&r, &before, &i, from("imp-src", 300));
        assert_eq!(d.arrival, Arrival::Duplicate);
        assert_eq!(d.pairs.len(), 1);
        assert_eq!(d.pairs[0].click_id, "pending");
        assert!(!d.buffered);
    }

    #[test]
    fn new_impression_is_forwarded_once_and_only_its_own_retry_forwards_again() {
        let r = JoinRules::default();
        let i = imp("i", "a", T0);
        let d = decide_impression(&r, &JoinItem::default(), &i, at(100));
        assert_eq!(d.forward.as_ref().map(|f| f.recovered), Some(false));

        let before = with_impression(&i, 100);
        let own = decide_impression(&r, &before, &i, from("imp-src", 200));
        assert_eq!(own.forward.as_ref().map(|f| f.recovered), Some(true));
        let other = decide_impression(&r, &before, &i, at(200));
        assert!(
            other.forward.is_none(),
            "a producer duplicate forwards nothing"
        );
        let stale = decide_impression(&r, &before, &i, at(100 + r.recovery_lease_ms + 1));
        assert_eq!(stale.forward.map(|f| f.recovered), Some(true));
    }

    #[test]
    fn recovered_pairs_are_flagged_and_new_ones_are_not() {
        let r = JoinRules::default();
        let c = click("c", "i", "a", T0);
        let mut before = with_impression(&imp("i", "a", T0), 100);
        assert!(!decide_click(&r, &before, &c, at(150)).pairs[0].recovered);
        store_click(&mut before, &c, 150, false);
        assert!(decide_click(&r, &before, &c, from("c-src", 300)).pairs[0].recovered);
    }

    #[test]
    fn reused_id_with_other_content_is_conflicting_and_changes_nothing() {
        let r = JoinRules::default();
        let before = with_impression(&imp("i", "a", T0), 100);
        let d = decide_impression(&r, &before, &imp("i", "other", T0), at(200));
        assert_eq!(d.arrival, Arrival::Conflicting);
        assert!(d.pairs.is_empty());

        let mut before = JoinItem::default();
        store_click(&mut before, &click("c", "i", "a", T0), 100, false);
        let d = decide_click(&r, &before, &click("c", "i", "a", T0 + 1), at(200));
        assert_eq!(d.arrival, Arrival::Conflicting);
    }

    #[test]
    fn a_new_click_past_the_limit_is_refused_and_a_stored_one_is_still_a_duplicate() {
        let r = JoinRules::default();
        let mut before = with_impression(&imp("i", "a", T0), 100);
        for n in 0..MAX_CLICKS_PER_IMPRESSION {
            store_click(
                &mut before,
                &click(&format!("c{n}"), "i", "a", T0),
                100,
                true,
            );
        }
        let d = decide_click(&r, &before, &click("one-more", "i", "a", T0), at(200));
        assert_eq!(d.arrival, Arrival::TooManyClicks);
        assert!(d.pairs.is_empty() && !d.buffered);
        let d = decide_click(&r, &before, &click("c0", "i", "a", T0), at(200));
        assert_eq!(d.arrival, Arrival::Duplicate);
    }

    #[test]
    fn partner_arriving_after_retention_is_late_not_joined() {
        let r = JoinRules {
            retention_ms: 1_000,
            ..JoinRules::default()
        };
        let i = imp("i", "a", T0);
        let before = with_impression(&i, 10_000);
        let d = decide_click(&r, &before, &click("c", "i", "a", T0), at(11_001));
        assert!(d.pairs.is_empty());
        assert_eq!(d.late.len(), 1);
        assert_eq!(d.late[0].arrival_gap_ms, 1_001);

        // Exactly at the retention it still joins.
        let d = decide_click(&r, &before, &click("c", "i", "a", T0), at(11_000));
        assert_eq!(d.pairs.len(), 1);

        // Symmetric: a click buffered too long before its impression.
        let mut before = JoinItem::default();
        store_click(&mut before, &click("c", "i", "a", T0), 10_000, false);
        let d = decide_impression(&r, &before, &i, at(20_000));
        assert!(d.pairs.is_empty());
        assert_eq!(d.late.len(), 1);
    }

    #[test]
    fn late_classification_is_stable_under_redelivery() {
        let r = JoinRules {
            retention_ms: 1_000,
            ..JoinRules::default()
        };
        let i = imp("i", "a", T0);
        let c = click("c", "i", "a", T0);
        let mut before = with_impression(&i, 10_000);
        store_click(&mut before, &c, 10_500, false);
        // Redelivered long after both expired: the stored arrivals still say "met in time".
        let d = decide_click(&r, &before, &c, from("c-src", 999_999));
        assert_eq!(d.pairs.len(), 1);
        assert!(d.late.is_empty());
    }
}
