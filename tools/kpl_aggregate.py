"""Packs records into KPL-aggregated Kinesis records with the reference Python implementation of
the format (aws-kinesis-agg's RecordAggregator), not adpipe's own: what the KPL test feeds the
pipeline, so adpipe's de-aggregation is checked against a producer it did not write.

Reads JSON on stdin:
  {"seed": 7, "max_group": 20, "streams": {"impressions": ["<base64 record>", ...], ...},
   "corrupt": {"impressions": ["<base64 record>", ...]}}
Writes JSON on stdout:
  {"streams": {"impressions": ["<base64 Kinesis record>", ...], ...},
   "aggregates": N, "user_records": N, "plain": N, "corrupt": N}

Each stream's records are cut into runs of 1..max_group (seeded); a run of one is sent plain
half the time, every other run as one aggregate, so plain and aggregated records mix. Each
record of `corrupt` becomes an aggregate spoilt one of three ways in turn: a wrong MD5 trailer,
a truncated protobuf body (with a matching trailer), a partition key index outside its table;
they are appended to their stream.
"""

import base64
import hashlib
import json
import random
import sys

import aws_kinesis_agg
from aws_kinesis_agg import aggregator, messages_pb2

MAGIC = aws_kinesis_agg.MAGIC


def aggregate(records):
    agg = aggregator.RecordAggregator()
    for i, data in enumerate(records):
        # Partition keys as a producer would set them; several records share one.
        result = agg.add_user_record(f"pk-{i % 3}", data)
        assert result is None, "a run never fills an aggregate"
    _, _, data = agg.clear_and_get().get_contents()
    return data


def framed(body):
    return MAGIC + body + hashlib.md5(body).digest()


def spoil(data, how):
    body = data[len(MAGIC) : -16]
    if how == 0:
        return data[:-1] + bytes([data[-1] ^ 0xFF])
    if how == 1:
        return framed(body[: len(body) // 2])
    message = messages_pb2.AggregatedRecord()
    message.ParseFromString(body)
    message.records[0].partition_key_index = len(message.partition_key_table)
    return framed(message.SerializeToString())


def main():
    job = json.load(sys.stdin)
    rng = random.Random(job["seed"])
    max_group = max(1, int(job.get("max_group", 20)))
    counts = {"aggregates": 0, "user_records": 0, "plain": 0, "corrupt": 0}
    out = {}
    for name, encoded in job["streams"].items():
        records = [base64.b64decode(r) for r in encoded]
        sent = []
        i = 0
        while i < len(records):
            n = min(rng.randint(1, max_group), len(records) - i)
            run = records[i : i + n]
            if n == 1 and rng.random() < 0.5:
                sent.append(run[0])
                counts["plain"] += 1
            else:
                sent.append(aggregate(run))
                counts["aggregates"] += 1
                counts["user_records"] += n
            i += n
        for k, r in enumerate(job.get("corrupt", {}).get(name, [])):
            data = base64.b64decode(r)
            sent.append(spoil(aggregate([data, data]), counts["corrupt"] % 3))
            counts["corrupt"] += 1
        out[name] = [base64.b64encode(r).decode() for r in sent]
    json.dump({"streams": out, **counts}, sys.stdout)


if __name__ == "__main__":
    main()
