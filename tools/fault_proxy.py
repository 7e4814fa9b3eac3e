#!/usr/bin/env python3
"""A fault-injecting HTTP proxy in front of the local AWS endpoint, for the fault tests.

    python3 tools/fault_proxy.py --upstream http://127.0.0.1:PORT [--port 0]

Prints `listening on PORT` once ready. Every request is forwarded to the upstream endpoint
unchanged, unless a rule picks it for a fault. The functions under test talk to the proxy
exactly as they talk to AWS (the production code path, SDK retries included); nothing in the
code under test knows about it.

Rules are set at run time:  POST /__faults  {"seed": 7, "rules": [RULE, ...]}
and the injected faults are counted:  GET /__faults  -> {"injected": {"<rule name>": n, ...}}

    RULE = {"name": "...", "service": "dynamodb", "operation": "UpdateItem",
            "fault": "throttle", "probability": 0.1, "max": 1000}
    or, deterministic for rare operations, "every": 3 instead of "probability": the 3rd,
    6th, ... request this rule sees gets the fault.

- service: the SigV4 signing name (dynamodb, kinesis, s3, glue, sqs), from Authorization.
- operation: the X-Amz-Target operation (UpdateItem, PutRecords, UpdateTable, ...), or for S3
  the HTTP method (PUT, GET, HEAD, DELETE, POST); "*" for any.
- body_contains (optional): only requests whose body holds this string, e.g.
  "\"Name\":\"impressions\"" for a Glue UpdateTable of one table.
- fault:
  - throttle: the service's throttling error, nothing forwarded
    (DynamoDB ProvisionedThroughputExceededException, Kinesis
    ProvisionedThroughputExceededException, S3 503 SlowDown, Glue ThrottlingException).
  - server_error: a 500 (S3: 503), nothing forwarded.
  - conflict: Glue ConcurrentModificationException (an Iceberg commit conflict), nothing
    forwarded.
  - lost_response: the request IS forwarded and done, then the client gets a 500: the
    response was lost.
  - lost_gateway: like lost_response, but the client gets what a gateway in front of the
    service sends when the upstream answer is lost: a 502 with an HTML body and no AWS error
    code (clients must take any 5xx as "may have been applied", whatever its code).
  - partial: Kinesis PutRecords only: each entry fails with the given probability
    (ProvisionedThroughputExceededException); only the others are forwarded, and the response
    merges both, in order, as Kinesis answers a partial failure.

Standard library only. The proxy exits when its parent process does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SCOPE = re.compile(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/aws4_request")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rules: list[dict] = []
        self.injected: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        self.rng = random.Random(0)

    def set(self, config: dict) -> None:
        with self.lock:
            self.rules = list(config.get("rules", []))
            self.rng = random.Random(config.get("seed", 0))
            self.injected = {}
            self.seen = {}

    def pick(self, service: str, operation: str, body: bytes = b"") -> dict | None:
        with self.lock:
            # Whole-request faults first; a `partial` rule decides per entry, after them.
            ordered = sorted(self.rules, key=lambda r: r["fault"] == "partial")
            for rule in ordered:
                if rule.get("service") not in (service, "*"):
                    continue
                if rule.get("operation", "*") not in (operation, "*"):
                    continue
                if "body_contains" in rule and rule["body_contains"].encode() not in body:
                    continue
                name = rule.get("name") or f"{service}.{operation}.{rule['fault']}"
                if self.injected.get(name, 0) >= rule.get("max", 1 << 62):
                    continue
                if rule["fault"] == "partial":
                    return rule  # decided per entry
                self.seen[name] = self.seen.get(name, 0) + 1
                if "every" in rule:
                    hit = self.seen[name] % rule["every"] == 0
                else:
                    hit = self.rng.random() < rule.get("probability", 1.0)
                if hit:
                    self.injected[name] = self.injected.get(name, 0) + 1
                    return rule
            return None

    def count(self, rule: dict, n: int = 1) -> None:
        name = rule.get("name") or f"{rule['service']}.{rule.get('operation', '*')}.{rule['fault']}"
        with self.lock:
            self.injected[name] = self.injected.get(name, 0) + n

    def entry_fails(self, rule: dict) -> bool:
        with self.lock:
            return self.rng.random() < rule.get("probability", 0.0)


STATE = State()
UPSTREAM = ("127.0.0.1", 0)


def json_error(status: int, type_: str, content_type: str) -> tuple[int, dict, bytes]:
    body = json.dumps({"__type": type_, "message": "injected by tools/fault_proxy.py"}).encode()
    return status, {"Content-Type": content_type}, body


def s3_error(status: int, code: str) -> tuple[int, dict, bytes]:
    body = (
        f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
        "<Message>injected by tools/fault_proxy.py</Message></Error>"
    ).encode()
    return status, {"Content-Type": "application/xml"}, body


def fault_response(service: str, fault: str, content_type: str) -> tuple[int, dict, bytes]:
    ct = content_type or "application/x-amz-json-1.0"
    if service == "s3":
        return s3_error(503, "SlowDown") if fault == "throttle" else s3_error(503, "ServiceUnavailable")
    if fault == "throttle":
        if service in ("dynamodb", "kinesis"):
            return json_error(400, "ProvisionedThroughputExceededException", ct)
        return json_error(400, "ThrottlingException", ct)
    if fault == "conflict":
        return json_error(400, "ConcurrentModificationException", ct)
    if service == "dynamodb":
        return json_error(500, "InternalServerError", ct)
    if service == "kinesis":
        return json_error(500, "InternalFailure", ct)
    return json_error(500, "InternalServiceException", ct)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until the empty line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def reply(self, status: int, headers: dict, body: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        length = str(len(body))
        if self.command == "HEAD":
            # A HEAD answer has no body but tells the length of the object.
            length = next((v for k, v in headers.items() if k.lower() == "content-length"), length)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def forward(self, body: bytes) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection(*UPSTREAM, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            return r.status, dict(r.getheaders()), data
        finally:
            conn.close()

    def control(self, body: bytes) -> None:
        if self.command == "POST":
            STATE.set(json.loads(body or b"{}"))
        with STATE.lock:
            out = json.dumps({"injected": STATE.injected, "rules": STATE.rules}).encode()
        self.reply(200, {"Content-Type": "application/json"}, out)

    def handle_any(self) -> None:
        body = self.read_body()
        if self.path.startswith("/__faults"):
            return self.control(body)
        m = SCOPE.search(self.headers.get("Authorization", ""))
        service = m.group(1) if m else "unknown"
        target = self.headers.get("X-Amz-Target", "")
        operation = target.rsplit(".", 1)[-1] if target else self.command
        rule = STATE.pick(service, operation, body)
        if rule is None:
            return self.reply(*self.forward(body))
        fault = rule["fault"]
        if fault == "lost_response":
            self.forward(body)
            return self.reply(*fault_response(service, "server_error", self.headers.get("Content-Type", "")))
        if fault == "lost_gateway":
            self.forward(body)
            page = b"<html><head><title>502 Bad Gateway</title></head><body>502 Bad Gateway</body></html>"
            return self.reply(502, {"Content-Type": "text/html"}, page)
        if fault == "partial" and service == "kinesis" and operation == "PutRecords":
            return self.partial_put_records(rule, body)
        return self.reply(*fault_response(service, fault, self.headers.get("Content-Type", "")))

    def partial_put_records(self, rule: dict, body: bytes) -> None:
        request = json.loads(body)
        entries = request["Records"]
        failed = [STATE.entry_fails(rule) for _ in entries]
        if not any(failed):
            return self.reply(*self.forward(body))
        STATE.count(rule, sum(failed))
        kept = [e for e, f in zip(entries, failed) if not f]
        results = iter([])
        if kept:
            status, headers, data = self.forward(json.dumps({**request, "Records": kept}).encode())
            if status != 200:
                return self.reply(status, headers, data)
            upstream = json.loads(data)
            results = iter(upstream["Records"])
        merged = []
        for f in failed:
            if f:
                merged.append(
                    {
                        "ErrorCode": "ProvisionedThroughputExceededException",
                        "ErrorMessage": "injected by tools/fault_proxy.py",
                    }
                )
            else:
                merged.append(next(results))
        count = sum(1 for r in merged if "ErrorCode" in r)
        out = json.dumps({"FailedRecordCount": count, "Records": merged}).encode()
        self.reply(200, {"Content-Type": self.headers.get("Content-Type", "application/x-amz-json-1.1")}, out)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = handle_any


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client that goes away mid-request (a crashed function's connection) is expected.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def exit_with_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.5)


def main() -> int:
    global UPSTREAM
    parser = argparse.ArgumentParser(description="Fault-injecting proxy for the local AWS endpoint.")
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:5000")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    u = urlsplit(args.upstream)
    UPSTREAM = (u.hostname or "127.0.0.1", u.port or 80)
    server = QuietServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
