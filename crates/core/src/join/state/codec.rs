//! A compact, column-wise encoding of stored events and pending outputs, compressed with zstd
//! after it.
//!
//! JSON spends most of a compressed event on its structure: a dozen field names and quotes per
//! event cost zstd a match each, about as much as the event's content (a UUID, two times, a
//! price and a few small enumerations). Written column by column, with small-cardinality
//! columns as a dictionary, times as deltas and pending outputs as references to the events
//! they name, the same events take a fifth less in slots (41 → 33 bytes per event) and a third
//! less in pages (BENCHMARKS.md, "Column-wise slots and pages").
//!
//! Every block starts with a magic that JSON cannot start with (a zero byte), so readers tell
//! this encoding from the JSON one written by earlier versions.

use std::collections::HashMap;

use crate::join::state::{Pending, Stored};
use crate::model::{Click, Impression};
use crate::ports::PortError;

/// Starts an events block.
pub const EVENTS_MAGIC: &[u8; 4] = b"\0ev2";
/// Starts a slot body (a JSON header, then an events block and a pending block).
pub const SLOT_MAGIC: &[u8; 4] = b"\0sl2";

const PLAIN: u8 = 0;
const DICT: u8 = 1;
/// Every value ends with a lowercase hyphenated UUID: a column of the values' prefixes (often
/// all empty, or a few), then each UUID as its 16 bytes. As text a UUID costs zstd about
/// 25 bytes among the other columns' bytes (its hex digits share one Huffman table with them).
const UUIDS: u8 = 2;

/// The 16 bytes of a lowercase hyphenated UUID (`8-4-4-4-12` hex digits), which print back
/// to the same text.
fn uuid_bytes(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut nibbles = 0usize;
    for (k, c) in b.iter().enumerate() {
        let dash = matches!(k, 8 | 13 | 18 | 23);
        let v = match (dash, c) {
            (true, b'-') => continue,
            (false, b'0'..=b'9') => c - b'0',
            (false, b'a'..=b'f') => c - b'a' + 10,
            _ => return None,
        };
        out[nibbles / 2] |= v << (4 * (1 - nibbles % 2));
        nibbles += 1;
    }
    Some(out)
}

/// A value's prefix and the UUID it ends with.
fn split_uuid(s: &str) -> Option<(&str, [u8; 16])> {
    let cut = s.len().checked_sub(36).filter(|c| s.is_char_boundary(*c))?;
    Some((&s[..cut], uuid_bytes(&s[cut..])?))
}

fn uuid_text(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (k, byte) in b.iter().enumerate() {
        if matches!(k, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(HEX[usize::from(byte >> 4)] as char);
        s.push(HEX[usize::from(byte & 15)] as char);
    }
    s
}

/// Appends `v` as a LEB128 varint.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A string column: a dictionary when values repeat, else every value in turn.
fn put_strings<'a>(out: &mut Vec<u8>, values: impl Iterator<Item = &'a str>) {
    let values: Vec<&str> = values.collect();
    put_column(out, &values);
}

fn put_column(out: &mut Vec<u8>, values: &[&str]) {
    let mut index: HashMap<&str, u64> = HashMap::new();
    let rows = values.len();
    for v in values {
        let next = index.len() as u64;
        index.entry(v).or_insert(next);
    }
    if rows > 0 && index.len() * 2 > rows && values.iter().all(|v| split_uuid(v).is_some()) {
        out.push(UUIDS);
        let prefixes: Vec<&str> = values
            .iter()
            .map(|v| split_uuid(v).map_or("", |p| p.0))
            .collect();
        put_column(out, &prefixes);
        for v in values {
            out.extend_from_slice(&split_uuid(v).map(|p| p.1).unwrap_or_default());
        }
    } else if index.len() * 2 <= rows {
        out.push(DICT);
        let mut dict: Vec<(&str, u64)> = index.iter().map(|(s, i)| (*s, *i)).collect();
        dict.sort_by_key(|(_, i)| *i);
        put_varint(out, dict.len() as u64);
        for (s, _) in dict {
            put_str(out, s);
        }
        for v in values {
            put_varint(out, index[*v]);
        }
    } else {
        out.push(PLAIN);
        for v in values {
            put_str(out, v);
        }
    }
}

/// An integer column, each value as its difference from the previous one.
fn put_deltas(out: &mut Vec<u8>, values: impl Iterator<Item = i64>) {
    let mut prev = 0i64;
    for v in values {
        put_i64(out, v.wrapping_sub(prev));
        prev = v;
    }
}

/// A reader over a block, every read bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn corrupt(what: &str) -> PortError {
    PortError::Corrupt(format!("event block: {what}"))
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, PortError> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| corrupt("truncated"))?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PortError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| corrupt("truncated"))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn varint(&mut self) -> Result<u64, PortError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("varint too long"))
    }

    /// A count of items, each at least one byte, so a corrupt count cannot allocate much.
    fn count(&mut self) -> Result<usize, PortError> {
        let n = self.varint()?;
        if n > (self.bytes.len() - self.at) as u64 {
            return Err(corrupt("count past the end"));
        }
        Ok(n as usize)
    }

    fn i64(&mut self) -> Result<i64, PortError> {
        let z = self.varint()?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    fn str(&mut self) -> Result<String, PortError> {
        let n = self.count()?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| corrupt("string is not UTF-8"))
    }

    fn strings(&mut self, rows: usize) -> Result<Vec<String>, PortError> {
        match self.byte()? {
            PLAIN => (0..rows).map(|_| self.str()).collect(),
            DICT => {
                let n = self.count()?;
                let dict: Vec<String> = (0..n).map(|_| self.str()).collect::<Result<_, _>>()?;
                (0..rows)
                    .map(|_| {
                        let i = self.varint()?;
                        dict.get(i as usize)
                            .cloned()
                            .ok_or_else(|| corrupt("dictionary index out of range"))
                    })
                    .collect()
            }
            UUIDS => self
                .strings(rows)?
                .into_iter()
                .map(|prefix| Ok(prefix + &uuid_text(self.take(16)?)))
                .collect(),
            m => Err(corrupt(&format!("unknown column mode {m}"))),
        }
    }

    fn deltas(&mut self, rows: usize) -> Result<Vec<i64>, PortError> {
        let mut prev = 0i64;
        (0..rows)
            .map(|_| {
                prev = prev.wrapping_add(self.i64()?);
                Ok(prev)
            })
            .collect()
    }

    fn prices(&mut self, rows: usize) -> Result<Vec<f64>, PortError> {
        self.strings(rows)?
            .iter()
            .map(|s| {
                s.parse::<f64>()
                    .map_err(|_| corrupt("price is not a number"))
            })
            .collect()
    }

    fn done(&self) -> Result<(), PortError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(corrupt("bytes after the end"))
        }
    }
}

/// The fields both kinds share, in column order.
fn common(e: &Stored) -> (&str, &str, &str, &str, i64, &str, &str, &str, i64) {
    match e {
        Stored::Impression(i, a) => (
            &i.ad_id,
            &i.impression_id,
            &i.campaign_id,
            &i.publisher_id,
            i.event_time_ms,
            &i.device_type,
            &i.geo_location,
            &i.platform,
            *a,
        ),
        Stored::Click(c, a) => (
            &c.ad_id,
            &c.impression_id,
            &c.campaign_id,
            &c.publisher_id,
            c.event_time_ms,
            &c.device_type,
            &c.geo_location,
            &c.platform,
            *a,
        ),
    }
}

/// Prices are written as their shortest decimal form, which reads back to the same `f64`.
fn price(e: &Stored) -> String {
    match e {
        Stored::Impression(i, _) => i.bid_price.to_string(),
        Stored::Click(c, _) => c.click_price.to_string(),
    }
}

/// Appends an events block (uncompressed).
fn put_events(out: &mut Vec<u8>, events: &[Stored]) {
    out.extend_from_slice(EVENTS_MAGIC);
    put_varint(out, events.len() as u64);
    out.extend(
        events
            .iter()
            .map(|e| u8::from(matches!(e, Stored::Click(..)))),
    );
    let c = || events.iter().map(common);
    put_strings(out, c().map(|f| f.0));
    put_strings(out, c().map(|f| f.1));
    put_strings(out, c().map(|f| f.2));
    put_strings(out, c().map(|f| f.3));
    put_deltas(out, c().map(|f| f.4));
    put_strings(out, c().map(|f| f.5));
    put_strings(out, c().map(|f| f.6));
    put_strings(out, c().map(|f| f.7));
    // Arrivals as their offset from the event time: small, and alike across events.
    put_deltas(out, c().map(|f| f.8.wrapping_sub(f.4)));
    let prices: Vec<String> = events.iter().map(price).collect();
    put_strings(out, prices.iter().map(String::as_str));
    let imps = || {
        events.iter().filter_map(|e| match e {
            Stored::Impression(i, _) => Some(i),
            Stored::Click(..) => None,
        })
    };
    put_strings(out, imps().map(|i| i.ad_type.as_str()));
    let clicks = || {
        events.iter().filter_map(|e| match e {
            Stored::Click(c, _) => Some(c),
            Stored::Impression(..) => None,
        })
    };
    put_strings(out, clicks().map(|c| c.click_id.as_str()));
    out.extend(clicks().map(|c| u8::from(c.click_id_derived)));
}

fn read_events(r: &mut Reader<'_>) -> Result<Vec<Stored>, PortError> {
    if r.take(4)? != EVENTS_MAGIC {
        return Err(corrupt("no events magic"));
    }
    let n = r.count()?;
    let kinds = r.take(n)?.to_vec();
    let ad = r.strings(n)?;
    let imp = r.strings(n)?;
    let camp = r.strings(n)?;
    let publ = r.strings(n)?;
    let time = r.deltas(n)?;
    let dev = r.strings(n)?;
    let geo = r.strings(n)?;
    let plat = r.strings(n)?;
    let lag = r.deltas(n)?;
    let price = r.prices(n)?;
    let n_clicks = kinds.iter().filter(|k| **k == 1).count();
    if kinds.iter().any(|k| *k > 1) {
        return Err(corrupt("unknown event kind"));
    }
    let ad_type = r.strings(n - n_clicks)?;
    let click_id = r.strings(n_clicks)?;
    let derived = r.take(n_clicks)?.to_vec();
    let (mut ad, mut imp, mut camp, mut publ, mut dev, mut geo, mut plat) = (
        ad.into_iter(),
        imp.into_iter(),
        camp.into_iter(),
        publ.into_iter(),
        dev.into_iter(),
        geo.into_iter(),
        plat.into_iter(),
    );
    let (mut ad_type, mut click_id, mut derived) = (
        ad_type.into_iter(),
        click_id.into_iter(),
        derived.into_iter(),
    );
    let mut events = Vec::with_capacity(n);
    for (k, kind) in kinds.iter().enumerate() {
        // Every column has n rows (the kind columns their kind's count): `next` cannot fail.
        let (ad_id, impression_id, campaign_id, publisher_id) = (
            ad.next().unwrap_or_default(),
            imp.next().unwrap_or_default(),
            camp.next().unwrap_or_default(),
            publ.next().unwrap_or_default(),
        );
        let (device_type, geo_location, platform) = (
            dev.next().unwrap_or_default(),
            geo.next().unwrap_or_default(),
            plat.next().unwrap_or_default(),
        );
        let event_time_ms = time[k];
        let arrival = event_time_ms.wrapping_add(lag[k]);
        events.push(if *kind == 0 {
            Stored::Impression(
                Impression {
                    ad_id,
                    impression_id,
                    campaign_id,
                    publisher_id,
                    event_time_ms,
                    device_type,
                    geo_location,
                    platform,
                    ad_type: ad_type.next().unwrap_or_default(),
                    bid_price: price[k],
                },
                arrival,
            )
        } else {
            Stored::Click(
                Click {
                    ad_id,
                    impression_id,
                    campaign_id,
                    publisher_id,
                    event_time_ms,
                    device_type,
                    geo_location,
                    platform,
                    click_price: price[k],
                    click_id: click_id.next().unwrap_or_default(),
                    click_id_derived: derived.next().unwrap_or_default() != 0,
                },
                arrival,
            )
        });
    }
    Ok(events)
}

/// Appends a pending block: each output's ids as a reference to the event of the block that
/// carries them (most outputs are the batch's own new events), else in full.
fn put_pending(out: &mut Vec<u8>, pending: &[Pending], events: &[Stored]) {
    let mut imp_at: HashMap<&str, i64> = HashMap::new();
    let mut click_at: HashMap<&str, i64> = HashMap::new();
    for (k, e) in events.iter().enumerate() {
        match e {
            Stored::Impression(i, _) => imp_at.entry(&i.impression_id).or_insert(k as i64),
            Stored::Click(c, _) => click_at.entry(&c.click_id).or_insert(k as i64),
        };
    }
    put_varint(out, pending.len() as u64);
    out.extend(
        pending
            .iter()
            .map(|p| u8::from(matches!(p, Pending::Pair(..)))),
    );
    let mut prev = -1i64;
    let mut put_ref = |out: &mut Vec<u8>, s: &str, at: &HashMap<&str, i64>| match at.get(s) {
        Some(k) => {
            let d = k - prev;
            prev = *k;
            // 0 means "in full"; a reference is its zigzag delta plus one.
            put_varint(out, ((d << 1) ^ (d >> 63)) as u64 + 1);
        }
        None => {
            put_varint(out, 0);
            put_str(out, s);
        }
    };
    for p in pending {
        match p {
            Pending::Forward(i) => put_ref(out, i, &imp_at),
            Pending::Pair(i, c) => {
                // A pair's impression id is the click's: one reference to the click serves.
                match click_at
                    .get(c.as_str())
                    .map(|k| common(&events[*k as usize]).1)
                {
                    Some(id) if id == i => put_ref(out, c, &click_at),
                    _ => {
                        put_varint(out, 0);
                        put_str(out, i);
                        put_str(out, c);
                    }
                }
            }
        }
    }
}

fn read_pending(r: &mut Reader<'_>, events: &[Stored]) -> Result<Vec<Pending>, PortError> {
    let n = r.count()?;
    let kinds = r.take(n)?.to_vec();
    let mut prev = -1i64;
    let mut pending = Vec::with_capacity(n);
    for kind in kinds {
        let tag = r.varint()?;
        let event = if tag == 0 {
            None
        } else {
            let z = tag - 1;
            prev += ((z >> 1) as i64) ^ -((z & 1) as i64);
            Some(
                usize::try_from(prev)
                    .ok()
                    .and_then(|k| events.get(k))
                    .ok_or_else(|| corrupt("pending reference out of range"))?,
            )
        };
        pending.push(match (kind, event) {
            (0, Some(Stored::Impression(i, _))) => Pending::Forward(i.impression_id.clone()),
            (0, None) => Pending::Forward(r.str()?),
            (1, Some(Stored::Click(c, _))) => {
                Pending::Pair(c.impression_id.clone(), c.click_id.clone())
            }
            (1, None) => Pending::Pair(r.str()?, r.str()?),
            _ => return Err(corrupt("pending reference names the wrong kind")),
        });
    }
    Ok(pending)
}

/// Compresses a list of events (a cold page, a ledger item).
pub fn encode_events(events: &[Stored], level: i32) -> Vec<u8> {
    let mut out = Vec::new();
    put_events(&mut out, events);
    zstd::bulk::compress(&out, level).expect("zstd compresses any input")
}

/// Reads events written by [`encode_events`] (decompressed).
pub fn decode_events(bytes: &[u8]) -> Result<Vec<Stored>, PortError> {
    let mut r = Reader { bytes, at: 0 };
    let events = read_events(&mut r)?;
    r.done()?;
    Ok(events)
}

/// Compresses a slot: `header` (the body's other fields, JSON), its events and its pending
/// outputs.
pub fn encode_slot(header: &[u8], events: &[Stored], pending: &[Pending]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(SLOT_MAGIC);
    put_varint(&mut out, header.len() as u64);
    out.extend_from_slice(header);
    put_events(&mut out, events);
    put_pending(&mut out, pending, events);
    zstd::bulk::compress(&out, 3).expect("zstd compresses any input")
}

/// A slot read back: its JSON header, events and pending outputs.
pub type SlotParts<'a> = (&'a [u8], Vec<Stored>, Vec<Pending>);

/// Reads a slot written by [`encode_slot`] (decompressed).
pub fn decode_slot(bytes: &[u8]) -> Result<SlotParts<'_>, PortError> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != SLOT_MAGIC {
        return Err(corrupt("no slot magic"));
    }
    let n = r.count()?;
    let header = r.take(n)?;
    let events = read_events(&mut r)?;
    let pending = read_pending(&mut r, &events)?;
    r.done()?;
    Ok((header, events, pending))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-c]{1,3}",
            "\\PC{0,40}",
            "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-a[0-9a-f]{3}-[0-9a-f]{12}",
        ]
    }

    fn price() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(0.0),
            Just(-0.0),
            (0u32..100_000).prop_map(|c| f64::from(c) / 100.0),
            any::<f64>().prop_filter("finite", |f| f.is_finite()),
        ]
    }

    fn stored() -> impl Strategy<Value = Stored> {
        let common = (
            text(),
            text(),
            text(),
            text(),
            any::<i64>(),
            text(),
            text(),
            text(),
            price(),
            any::<i64>(),
        );
        (common, any::<bool>(), text(), any::<bool>()).prop_map(
            |((ad, imp, camp, publ, t, dev, geo, plat, p, a), click, extra, derived)| {
                if click {
                    Stored::Click(
                        Click {
                            ad_id: ad,
                            impression_id: imp,
                            campaign_id: camp,
                            publisher_id: publ,
                            event_time_ms: t,
                            device_type: dev,
                            geo_location: geo,
                            platform: plat,
                            click_price: p,
                            click_id: extra,
                            click_id_derived: derived,
                        },
                        a,
                    )
                } else {
                    Stored::Impression(
                        Impression {
                            ad_id: ad,
                            impression_id: imp,
                            campaign_id: camp,
                            publisher_id: publ,
                            event_time_ms: t,
                            device_type: dev,
                            geo_location: geo,
                            platform: plat,
                            ad_type: extra,
                            bid_price: p,
                        },
                        a,
                    )
                }
            },
        )
    }

    /// Outputs naming the block's events (by reference) and others (in full).
    fn pending_for(events: &[Stored], picks: &[(usize, bool)]) -> Vec<Pending> {
        picks
            .iter()
            .map(|(k, other)| match (events.get(*k), other) {
                (Some(Stored::Impression(i, _)), false) => {
                    Pending::Forward(i.impression_id.clone())
                }
                (Some(Stored::Click(c, _)), false) => {
                    Pending::Pair(c.impression_id.clone(), c.click_id.clone())
                }
                (Some(e), true) => Pending::Pair(common(e).1.to_owned(), format!("other-{k}")),
                (None, _) => Pending::Forward(format!("absent-{k}")),
            })
            .collect()
    }

    fn same(a: &[Stored], b: &[Stored]) -> bool {
        // Prices compare by bits: -0.0 and 0.0 must stay apart.
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                x == y
                    && match (x, y) {
                        (Stored::Impression(i, _), Stored::Impression(j, _)) => {
                            i.bid_price.to_bits() == j.bid_price.to_bits()
                        }
                        (Stored::Click(c, _), Stored::Click(d, _)) => {
                            c.click_price.to_bits() == d.click_price.to_bits()
                        }
                        _ => false,
                    }
            })
    }

    proptest! {
        #[test]
        fn events_read_back_as_written(events in prop::collection::vec(stored(), 0..40)) {
            let bytes = encode_events(&events, 3);
            let raw = zstd::stream::decode_all(&bytes[..]).unwrap();
            prop_assert!(same(&decode_events(&raw).unwrap(), &events));
        }

        #[test]
        fn uuid_columns_read_back_as_written(
            events in prop::collection::vec(
                (stored(), "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
                1..40,
            ),
        ) {
            let events: Vec<Stored> = events
                .into_iter()
                .map(|(mut e, id)| {
                    match &mut e {
                        Stored::Impression(i, _) => i.impression_id = id,
                        Stored::Click(c, _) => {
                            c.impression_id = id.clone();
                            c.click_id = id;
                        }
                    }
                    e
                })
                .collect();
            let mut raw = Vec::new();
            put_events(&mut raw, &events);
            prop_assert!(same(&decode_events(&raw).unwrap(), &events));
            // The impression id column is stored as bytes: as text (one byte more at the
            // end) it takes 21 bytes more per event, less the prefix column's 3.
            let text: Vec<Stored> = events
                .iter()
                .cloned()
                .map(|mut e| {
                    match &mut e {
                        Stored::Impression(i, _) => i.impression_id.push('x'),
                        Stored::Click(c, _) => c.impression_id.push('x'),
                    }
                    e
                })
                .collect();
            let mut longer = Vec::new();
            put_events(&mut longer, &text);
            prop_assert!(longer.len() + 3 >= raw.len() + 21 * events.len());
            // A prefix is kept.
            let prefixed: Vec<Stored> = events
                .iter()
                .cloned()
                .enumerate()
                .map(|(k, mut e)| {
                    let p = format!("m{}-", k % 3);
                    match &mut e {
                        Stored::Impression(i, _) => i.impression_id.insert_str(0, &p),
                        Stored::Click(c, _) => c.impression_id.insert_str(0, &p),
                    }
                    e
                })
                .collect();
            let mut raw = Vec::new();
            put_events(&mut raw, &prefixed);
            prop_assert!(same(&decode_events(&raw).unwrap(), &prefixed));
        }

        #[test]
        fn slots_read_back_as_written(
            events in prop::collection::vec(stored(), 0..40),
            picks in prop::collection::vec((0usize..50, any::<bool>()), 0..40),
        ) {
            let pending = pending_for(&events, &picks);
            let bytes = encode_slot(b"{\"v\":2}", &events, &pending);
            let raw = zstd::stream::decode_all(&bytes[..]).unwrap();
            let (header, back, back_pending) = decode_slot(&raw).unwrap();
            prop_assert_eq!(header, b"{\"v\":2}");
            prop_assert!(same(&back, &events));
            prop_assert_eq!(back_pending, pending);
        }

        #[test]
        fn a_damaged_block_is_an_error_not_a_panic(
            events in prop::collection::vec(stored(), 1..10),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let mut raw = Vec::new();
            put_events(&mut raw, &events);
            let _ = decode_events(&raw[..cut.index(raw.len())]);
            let k = flip.index(raw.len());
            raw[k] ^= 0xff;
            let _ = decode_events(&raw);
        }
    }

    #[test]
    fn uuids_are_stored_as_bytes_and_read_back_as_text() {
        let id = "0f1e2d3c-4b5a-4968-a7b6-c5d4e3f2a1b0";
        assert_eq!(uuid_text(&uuid_bytes(id).unwrap()), id);
        for not in [
            "0F1E2D3C-4B5A-4968-A7B6-C5D4E3F2A1B0",
            "0f1e2d3c4b5a4968a7b6c5d4e3f2a1b0",
            "0f1e2d3c-4b5a-4968-a7b6-c5d4e3f2a1bg",
            "0f1e2d3c-4b5a-4968-a7b6c-5d4e3f2a1b0",
        ] {
            assert_eq!(uuid_bytes(not), None, "{not}");
        }
    }

    #[test]
    fn a_truncated_block_is_corrupt() {
        let mut raw = Vec::new();
        put_events(&mut raw, &[]);
        assert!(decode_events(&raw).unwrap().is_empty());
        assert!(matches!(
            decode_events(&raw[..raw.len() - 1]),
            Err(PortError::Corrupt(_))
        ));
        assert!(matches!(decode_events(b"[]"), Err(PortError::Corrupt(_))));
    }
}
