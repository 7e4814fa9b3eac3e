#!/usr/bin/env python3
"""Writes the sample Lambda events in events/ (real-shaped Kinesis events) and the hostile-input
corpus in tests/corpus/hostile/ (one file per case, expected.json with the reason each gets).

The same files feed `cargo lambda invoke --data-file events/...` and the tests. Re-run after
changing them: python3 tools/make_events.py

These files name the local stage's streams. `adpipe events --stack NAME` (or `--stage local`)
writes them for a stage: the same records, with that stage's stream ARNs, region and roles
(tools/local/src/events.rs compiles these files in; its test checks that the local stage gets
them back byte for byte, so this script stays the one source of their content).
"""
import base64
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
ACCOUNT = "123456789012"
REGION = "us-east-1"


def record(stream, shard, seq, partition_key, data: bytes, arrival):
    return {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": partition_key,
            "sequenceNumber": seq,
            "data": base64.b64encode(data).decode(),
            "approximateArrivalTimestamp": arrival,
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": f"{shard}:{seq}",
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": f"arn:aws:iam::{ACCOUNT}:role/adpipe-local-joiner",
        "awsRegion": REGION,
        "eventSourceARN": f"arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{stream}",
    }


def event(stream, payloads, shard="shardId-000000000000", base_seq=49656853465235457112345678901234567890123456789000,
          arrival=1795169730.5):
    records = []
    for n, p in enumerate(payloads):
        data = p if isinstance(p, bytes) else json.dumps(p, separators=(",", ":")).encode()
        key = (("b0" if "impressions" in p else p.get("impression_id", "x"))
               if isinstance(p, dict) else "malformed")
        records.append(record(stream, shard, str(base_seq + n * 10), str(key), data, arrival + n))
    return {"Records": records}


def imp(i, ad, camp, device, bid, t, **extra):
    return dict(ad_id=ad, impression_id=i, campaign_id=camp, publisher_id="pub-7", event_time=t,
                device_type=device, geo_location="US-CA", platform="ios", ad_type="banner",
                bid_price=bid, **extra)


def click(i, ad, camp, t, price, click_id=None):
    c = dict(ad_id=ad, impression_id=i, campaign_id=camp, publisher_id="pub-7", event_time=t,
             device_type="mobile", geo_location="US-CA", platform="ios", click_price=price)
    if click_id is not None:
        c["click_id"] = click_id
    return c


impressions = [
    imp("imp-1001", "ad-1", "camp-1", "mobile", 62.5, "2026-11-20T10:15:00.000Z"),
    imp("imp-1002", "ad-2", "camp-1", "Tablet", 50, "2026-11-20T10:15:05.250Z"),
    imp("imp-1003", "ad-3", "camp-2", " desktop ", 12.75, "2026-11-20T12:15:10.5+02:00"),
    imp("imp-1004", "ad-1", "camp-2", "SmartTV", 80, "2026-11-20T10:15:20.123456Z", unknown_field=[1, 2]),
]
impressions.append(impressions[0])  # a redelivery

clicks = [
    click("imp-1001", "ad-1", "camp-1", "2026-11-20T10:15:12.000Z", 0.5, "clk-1"),
    click("imp-1001", "ad-1", "camp-1", "2026-11-20T10:15:30.000Z", 0.25),  # +30.000 s: joins; derived id
    click("imp-1002", "ad-2", "camp-1", "2026-11-20T10:15:35.251Z", 0.4, "clk-2"),  # +30.001 s: no join
    click("imp-1003", "ad-3", "camp-2", "2026-11-20T10:15:08.500Z", 1.0, "clk-3"),  # click before impression
    click("imp-9999", "ad-1", "camp-1", "2026-11-20T10:16:00Z", 0.3, "clk-4"),  # impression never comes
    click("imp-1004", "ad-9", "camp-2", "2026-11-20T10:15:21Z", 0.6, "clk-5"),  # ad_id mismatch
]
clicks.append(clicks[0])  # a redelivery

good = imp("imp-2001", "ad-1", "camp-1", "phone", 10, "2026-11-20T10:20:00Z")
malformed = [
    b"this is not json",
    b"\xff\xfe\xfd",
    b"[1,2,3]",
    b'{"ad_id":"ad-1"} trailing',
    {k: v for k, v in good.items() if k != "campaign_id"},
    {**good, "ad_id": None},
    {**good, "bid_price": "12.5"},
    {**good, "impression_id": ""},
    {**good, "bid_price": -1},
    {**good, "event_time": "2026-02-30T10:00:00Z"},
    b'{"bid_price": 1e999}',
    good,  # a valid record after the bad ones: the shard is not blocked
]

def joined_click(i, ad, camp, imp_t, click_t, device, bid, click_id, price, recovered=False):
    return {"type": "click", "schema_version": 1, "recovered": recovered, "impression_id": i,
            "click_id": click_id, "click_id_derived": False, "ad_id": ad, "campaign_id": camp,
            "publisher_id": "pub-7", "impression_time": imp_t, "click_time": click_t,
            "device_type": device, "geo_location": "US-CA", "platform": "ios", "ad_type": "banner",
            "bid_price": bid, "click_price": price, "click_campaign_id": camp,
            "click_publisher_id": "pub-7", "click_device_type": "mobile",
            "click_geo_location": "US-CA", "click_platform": "ios"}


def joined_impression(i, ad, camp, t, device, bid, recovered=False):
    return {"type": "impression", "schema_version": 1, "recovered": recovered, "impression_id": i,
            "ad_id": ad, "campaign_id": camp, "publisher_id": "pub-7", "impression_time": t,
            "device_type": device, "geo_location": "US-CA", "platform": "ios", "ad_type": "banner",
            "bid_price": bid}


def pack(impressions):
    return {"type": "impressions",
            "impressions": [{k: v for k, v in i.items() if k != "type"} for i in impressions]}


# The joined stream as the joiner writes it: impressions forwarded for the lake, attributed
# clicks, a recovered repeat, a malformed record, and campaign ids that try to leave the table.
joined = [
    joined_impression("imp-1001", "ad-1", "camp-1", "2026-11-20T10:15:00.000Z", "mobile", 62.5),
    joined_click("imp-1001", "ad-1", "camp-1", "2026-11-20T10:15:00.000Z", "2026-11-20T10:15:12.000Z", "mobile", 62.5, "clk-1", 0.5),
    joined_impression("imp-1002", "ad-2", "camp-1", "2026-11-20T10:15:05.250Z", "Tablet", 50),
    joined_impression("imp-1003", "ad-3", "camp-2", "2026-11-20T10:15:10.500Z", " desktop ", 12.75),
    joined_click("imp-1003", "ad-3", "camp-2", "2026-11-20T10:15:10.500Z", "2026-11-20T10:15:08.500Z", " desktop ", 12.75, "clk-3", 1.0),
    joined_click("imp-1001", "ad-1", "camp-1", "2026-11-20T10:15:00.000Z", "2026-11-20T10:15:12.000Z", "mobile", 62.5, "clk-1", 0.5, recovered=True),
    # Forwarded impressions travel packed, several to a record (the joiner packs one bucket's;
    # the enricher takes any).
    pack([
        joined_impression("imp-1004", "ad-1", "../x", "2026-11-20T10:15:20.123Z", "SmartTV", 80),
        joined_impression("imp-1005", "ad-1", "a/b", "2026-11-20T10:16:20Z", "iPad", 51),
        joined_impression("imp-1006", "ad-1", "%2F", "2026-11-20T10:16:40Z", "PC", 5),
        joined_impression("imp-1007", "ad-1", "kampagne-ü", "2026-11-20T23:59:59.999Z", "android", 0),
    ]),
    b'{"type":"click","schema_version":1}',
]

# Hostile input: (name, kind, record bytes or object, the reason it must be dead-lettered with,
# or None when it must be accepted). Kept in the repo as files so a fuzzer or another tool can
# use them as they are.
base_imp = imp("h-imp-1", "ad-1", "camp-1", "mobile", 62.5, "2026-11-20T10:15:00.000Z")
base_click = click("h-imp-1", "ad-1", "camp-1", "2026-11-20T10:15:10.000Z", 0.5, "h-clk-1")


def nested(depth):
    return ("[" * depth + "]" * depth).encode()


hostile = [
    ("ok-baseline", "impression", base_imp, None),
    ("ok-unknown-extra-fields", "impression", {**base_imp, "x": {"y": [1, {"z": None}]}, "Ad_Id": 3}, None),
    ("ok-offset-plus-05-45", "impression", {**base_imp, "event_time": "2026-11-20T15:45:30.5+05:45"}, None),
    ("ok-offset-minus-12-00", "impression", {**base_imp, "event_time": "2026-11-19T22:15:00-12:00"}, None),
    ("ok-nanosecond-fraction", "impression", {**base_imp, "event_time": "2026-11-20T10:15:00.123456789Z"}, None),
    ("ok-negative-zero-price", "impression", {**base_imp, "bid_price": -0.0}, None),
    ("ok-huge-integer-price", "impression", b'{"ad_id":"ad-1","impression_id":"h-imp-1","campaign_id":"camp-1","publisher_id":"pub-7","event_time":"2026-11-20T10:15:00Z","device_type":"mobile","geo_location":"US-CA","platform":"ios","ad_type":"banner","bid_price":123456789012345678901234567890}', None),
    ("ok-unicode-ids", "impression", {**base_imp, "campaign_id": "кампания-🚀", "publisher_id": "出版社"}, None),
    ("ok-percent-encoded-campaign", "impression", {**base_imp, "campaign_id": "a%2F..%2Fb"}, None),
    ("ok-nested-unknown-field-depth-100", "impression", b'{"deep":' + nested(100) + b',' + json.dumps(base_imp, separators=(",", ":")).encode()[1:], None),
    ("ok-1mb-record", "impression", {**base_imp, "padding": "p" * (1_000_000 - 260)}, None),
    ("invalid-utf8", "impression", b'{"ad_id":"\xff\xfe"}'.replace(b"\\xff\\xfe", b"\xff\xfe"), "invalid_utf8"),
    ("invalid-utf8-overlong-slash", "impression", b'{"campaign_id":"\xc0\xaf"}'.replace(b"\\xc0\\xaf", b"\xc0\xaf"), "invalid_utf8"),
    ("not-json", "impression", b"this is not json", "invalid_json"),
    ("empty", "impression", b"", "invalid_json"),
    ("whitespace-only", "impression", b" \n\t ", "invalid_json"),
    ("utf8-bom", "impression", "\ufeff".encode() + json.dumps(base_imp).encode(), "invalid_json"),
    ("trailing-garbage", "impression", json.dumps(base_imp).encode() + b" trailing", "invalid_json"),
    ("two-documents", "impression", json.dumps(base_imp).encode() + json.dumps(base_imp).encode(), "invalid_json"),
    ("truncated", "impression", json.dumps(base_imp).encode()[:40], "invalid_json"),
    ("lone-surrogate-escape", "impression", b'{"ad_id":"\\ud800"}', "invalid_json"),
    ("nan-literal", "impression", json.dumps({**base_imp, "bid_price": float("nan")}).encode(), "invalid_json"),
    ("infinity-literal", "impression", json.dumps({**base_imp, "bid_price": float("inf")}).encode(), "invalid_json"),
    ("overflowing-number", "impression", json.dumps(base_imp).encode().replace(b"62.5", b"1e400"), "invalid_json"),
    ("deeply-nested-100000", "impression", nested(100_000), "invalid_json"),
    ("deeply-nested-in-field", "impression", b'{"ad_id":' + nested(10_000) + b"}", "invalid_json"),
    ("json-array", "impression", [base_imp], "not_an_object"),
    ("json-number", "impression", b"42", "not_an_object"),
    ("json-string", "impression", b'"h-imp-1"', "not_an_object"),
    ("json-null", "impression", b"null", "not_an_object"),
    ("json-true", "impression", b"true", "not_an_object"),
    ("missing-field", "impression", {k: v for k, v in base_imp.items() if k != "bid_price"}, "missing_field"),
    ("empty-object", "impression", {}, "missing_field"),
    ("null-field", "impression", {**base_imp, "ad_id": None}, "null_field"),
    ("null-time", "impression", {**base_imp, "event_time": None}, "null_field"),
    ("empty-id", "impression", {**base_imp, "impression_id": ""}, "empty_id"),
    ("blank-id", "impression", {**base_imp, "impression_id": " \t "}, "empty_id"),
    # "" is as invalid as a missing field, for every string field; " " is a value.
    ("empty-device-type", "impression", {**base_imp, "device_type": ""}, "empty_field"),
    ("empty-geo-location", "impression", {**base_imp, "geo_location": ""}, "empty_field"),
    ("empty-platform", "impression", {**base_imp, "platform": ""}, "empty_field"),
    ("empty-ad-type", "impression", {**base_imp, "ad_type": ""}, "empty_field"),
    ("empty-event-time", "impression", {**base_imp, "event_time": ""}, "empty_field"),
    ("empty-ad-id", "impression", {**base_imp, "ad_id": ""}, "empty_id"),
    ("empty-publisher-id", "impression", {**base_imp, "publisher_id": ""}, "empty_id"),
    ("ok-blank-device-type", "impression", {**base_imp, "device_type": " "}, None),
    ("ok-unknown-device-type", "impression", {**base_imp, "device_type": "smart-fridge"}, None),
    ("id-too-long", "impression", {**base_imp, "impression_id": "i" * 257}, "id_too_long"),
    ("id-1mb", "impression", {**base_imp, "impression_id": "i" * 999_000}, "id_too_long"),
    ("device-type-too-long", "impression", {**base_imp, "device_type": "m" * 257}, "field_too_long"),
    ("geo-location-too-long-in-bytes", "impression", {**base_imp, "geo_location": "\u00e9" * 129}, "field_too_long"),
    ("event-time-fraction-too-long", "impression", {**base_imp, "event_time": "2026-11-20T10:15:00." + "1" * 300 + "Z"}, "field_too_long"),
    ("ok-device-type-at-limit", "impression", {**base_imp, "device_type": "m" * 256}, None),
    ("control-char-in-id", "impression", {**base_imp, "impression_id": "h-imp\u0000-1"}, "invalid_id"),
    ("newline-in-campaign", "impression", {**base_imp, "campaign_id": "camp\n1"}, "invalid_id"),
    ("campaign-path-traversal", "impression", {**base_imp, "campaign_id": "../../../etc"}, "invalid_id"),
    ("campaign-backslash-traversal", "impression", {**base_imp, "campaign_id": "..\\..\\x"}, "invalid_id"),
    ("campaign-dot-dot", "impression", {**base_imp, "campaign_id": ".."}, "invalid_id"),
    ("campaign-absolute-path", "impression", {**base_imp, "campaign_id": "/etc/passwd"}, "invalid_id"),
    ("price-as-string", "impression", {**base_imp, "bid_price": "62.5"}, "wrong_type"),
    ("price-as-bool", "impression", {**base_imp, "bid_price": True}, "wrong_type"),
    ("id-as-number", "impression", {**base_imp, "impression_id": 7}, "wrong_type"),
    ("id-as-object", "impression", {**base_imp, "ad_id": {"id": "ad-1"}}, "wrong_type"),
    ("time-as-epoch-number", "impression", {**base_imp, "event_time": 1795169700}, "wrong_type"),
    ("text-as-array", "impression", {**base_imp, "device_type": ["mobile"]}, "wrong_type"),
    ("negative-price", "impression", {**base_imp, "bid_price": -0.01}, "negative_price"),
    ("impossible-date-feb-30", "impression", {**base_imp, "event_time": "2026-02-30T10:00:00Z"}, "invalid_time"),
    ("impossible-month-13", "impression", {**base_imp, "event_time": "2026-13-01T10:00:00Z"}, "invalid_time"),
    ("impossible-hour-25", "impression", {**base_imp, "event_time": "2026-11-20T25:00:00Z"}, "invalid_time"),
    ("no-offset", "impression", {**base_imp, "event_time": "2026-11-20T10:15:00"}, "invalid_time"),
    ("offset-without-colon", "impression", {**base_imp, "event_time": "2026-11-20T10:15:00+0530"}, "invalid_time"),
    ("offset-24-hours", "impression", {**base_imp, "event_time": "2026-11-20T10:15:00+24:00"}, "invalid_time"),
    ("date-only", "impression", {**base_imp, "event_time": "2026-11-20"}, "invalid_time"),
    ("time-not-a-date", "impression", {**base_imp, "event_time": "yesterday"}, "invalid_time"),
    # Valid times out of bounds (default bounds; the events' arrival is 2026-11-20T10:15:30Z and
    # later): a clock far ahead of arrival, before the earliest accepted time, year 1 and 9999.
    ("time-2h-ahead-of-arrival", "impression", {**base_imp, "event_time": "2026-11-20T12:20:00Z"}, "event_time_in_future"),
    ("time-year-9999", "impression", {**base_imp, "event_time": "9999-12-31T23:59:59Z"}, "event_time_in_future"),
    ("time-before-earliest", "impression", {**base_imp, "event_time": "2019-12-31T23:59:59.999Z"}, "event_time_too_early"),
    ("time-year-0001", "impression", {**base_imp, "event_time": "0001-01-01T00:00:00Z"}, "event_time_too_early"),
    ("click-time-ahead-of-arrival", "click", {**base_click, "event_time": "2026-11-21T10:15:10Z"}, "event_time_in_future"),
    # Ids whose percent-encoding is far longer than S3's 1,024-byte key limit: accepted, and
    # every key built from them is bounded (a digest replaces the tail of a long segment).
    ("ok-long-non-ascii-campaign", "impression", {**base_imp, "campaign_id": "\u00e9" * 256}, None),
    ("ok-long-4-byte-ids", "impression", {**base_imp, "campaign_id": "\U0001D11E" * 256, "ad_id": "\U0001D11E" * 256}, None),
    ("ok-click", "click", base_click, None),
    ("ok-click-null-click-id", "click", {**base_click, "click_id": None}, None),
    ("click-negative-price", "click", {**base_click, "click_price": -1}, "negative_price"),
    ("click-missing-price", "click", {k: v for k, v in base_click.items() if k != "click_price"}, "missing_field"),
    ("click-empty-click-id", "click", {**base_click, "click_id": ""}, "empty_id"),
    ("click-empty-device-type", "click", {**base_click, "device_type": ""}, "empty_field"),
    ("click-empty-geo-location", "click", {**base_click, "geo_location": ""}, "empty_field"),
    ("click-empty-platform", "click", {**base_click, "platform": ""}, "empty_field"),
    ("click-empty-campaign-id", "click", {**base_click, "campaign_id": ""}, "empty_id"),
    ("click-numeric-click-id", "click", {**base_click, "click_id": 12}, "wrong_type"),
    ("click-campaign-traversal", "click", {**base_click, "campaign_id": "../x"}, "invalid_id"),
]


# Accepted cases get ids of their own, so that in one batch none conflicts with another.
def own_ids(name, kind, payload):
    if isinstance(payload, dict):
        key = "impression_id" if kind == "impression" else "click_id"
        return {**payload, key: f"h-{name}"}
    return payload.replace(b'"impression_id":"h-imp-1"', f'"impression_id":"h-{name}"'.encode())


hostile = [(n, k, own_ids(n, k, p) if r is None else p, r) for n, k, p, r in hostile]


def as_bytes(payload):
    if isinstance(payload, bytes):
        return payload
    # allow_nan: the NaN/Infinity cases are built with json.dumps on purpose.
    return json.dumps(payload, separators=(",", ":")).encode()


corpus = ROOT / "tests" / "corpus" / "hostile"
corpus.mkdir(parents=True, exist_ok=True)
for old in corpus.glob("*.bin"):
    old.unlink()
expected = {}
for name, kind, payload, reason in hostile:
    (corpus / f"{name}.bin").write_bytes(as_bytes(payload))
    expected[name] = {"kind": kind, "reason": reason}
(corpus / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
print("wrote", len(hostile), "cases to", corpus)

hostile_impressions = [as_bytes(p) for _, kind, p, _ in hostile if kind == "impression"]
hostile_clicks = [as_bytes(p) for _, kind, p, _ in hostile if kind == "click"]
bad_base64 = event("adpipe-local-impressions", [b"x"], shard="shardId-000000000004")["Records"][0]
bad_base64["kinesis"]["data"] = "this is not base64!"
bad_base64["kinesis"]["sequenceNumber"] = "49656853465235457112345678901234567890123456789999"
bad_base64["eventID"] = "shardId-000000000004:49656853465235457112345678901234567890123456789999"
hostile_impressions_event = event("adpipe-local-impressions", hostile_impressions, shard="shardId-000000000004")
hostile_impressions_event["Records"].append(bad_base64)

out = ROOT / "events"
out.mkdir(exist_ok=True)
for name, ev in {
    "impressions.json": event("adpipe-local-impressions", impressions),
    "clicks.json": event("adpipe-local-clicks", clicks, shard="shardId-000000000001"),
    "malformed.json": event("adpipe-local-impressions", malformed, shard="shardId-000000000002"),
    # Joined records arrive after their events: 2026-11-21T00:00:30.5Z, after the latest time
    # they carry (imp-1007 at 23:59:59.999Z), as the joiner emits them.
    "joined.json": event("adpipe-local-joined", joined, shard="shardId-000000000003", arrival=1795219230.5),
    "hostile-impressions.json": hostile_impressions_event,
    "hostile-clicks.json": event("adpipe-local-clicks", hostile_clicks, shard="shardId-000000000005"),
}.items():
    (out / name).write_text(json.dumps(ev, indent=2) + "\n")
    print("wrote", out / name)
