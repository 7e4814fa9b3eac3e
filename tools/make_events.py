#!/usr/bin/env python3
"""Writes the sample Lambda events in events/ (real-shaped Kinesis events).

The same files feed `cargo lambda invoke --data-file events/...` and the tests. Re-run after
changing them: python3 tools/make_events.py
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


def event(stream, payloads, shard="shardId-000000000000", base_seq=49656853465235457112345678901234567890123456789000):
    records = []
    for n, p in enumerate(payloads):
        data = p if isinstance(p, bytes) else json.dumps(p, separators=(",", ":")).encode()
        key = p.get("impression_id", "x") if isinstance(p, dict) else "malformed"
        records.append(record(stream, shard, str(base_seq + n * 10), str(key), data, 1795169730.5 + n))
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


# The joined stream as the joiner writes it: impressions forwarded for the lake, attributed
# clicks, a recovered repeat, a malformed record, and campaign ids that try to leave the table.
joined = [
    joined_impression("imp-1001", "ad-1", "camp-1", "2026-11-20T10:15:00.000Z", "mobile", 62.5),
    joined_click("imp-1001", "ad-1", "camp-1", "2026-11-20T10:15:00.000Z", "2026-11-20T10:15:12.000Z", "mobile", 62.5, "clk-1", 0.5),
    joined_impression("imp-1002", "ad-2", "camp-1", "2026-11-20T10:15:05.250Z", "Tablet", 50),
    joined_impression("imp-1003", "ad-3", "camp-2", "2026-11-20T10:15:10.500Z", " desktop ", 12.75),
    joined_click("imp-1003", "ad-3", "camp-2", "2026-11-20T10:15:10.500Z", "2026-11-20T10:15:08.500Z", " desktop ", 12.75, "clk-3", 1.0),
    joined_click("imp-1001", "ad-1", "camp-1", "2026-11-20T10:15:00.000Z", "2026-11-20T10:15:12.000Z", "mobile", 62.5, "clk-1", 0.5, recovered=True),
    joined_impression("imp-1004", "ad-1", "../x", "2026-11-20T10:15:20.123Z", "SmartTV", 80),
    joined_impression("imp-1005", "ad-1", "a/b", "2026-11-20T10:16:20Z", "iPad", 51),
    joined_impression("imp-1006", "ad-1", "%2F", "2026-11-20T10:16:40Z", "PC", 5),
    joined_impression("imp-1007", "ad-1", "kampagne-ü", "2026-11-20T23:59:59.999Z", "android", 0),
    b'{"type":"click","schema_version":1}',
]

out = ROOT / "events"
out.mkdir(exist_ok=True)
for name, ev in {
    "impressions.json": event("adpipe-local-impressions", impressions),
    "clicks.json": event("adpipe-local-clicks", clicks, shard="shardId-000000000001"),
    "malformed.json": event("adpipe-local-impressions", malformed, shard="shardId-000000000002"),
    "joined.json": event("adpipe-local-joined", joined, shard="shardId-000000000003"),
}.items():
    (out / name).write_text(json.dumps(ev, indent=2) + "\n")
    print("wrote", out / name)
