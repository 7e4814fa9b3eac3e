#!/usr/bin/env python3
"""The local AWS-compatible endpoint: moto's server, with requests applied one at a time.

    .venv/bin/python tools/moto_endpoint.py -H 127.0.0.1 -p PORT

Why not plain `moto_server`: it serves each request on its own thread and applies two concurrent
requests to one DynamoDB item without isolation. Two `UpdateItem`s can both read the item as it was
before the other and both write, so one update is lost, where DynamoDB applies every write to an
item atomically and in some order. adpipe's exactly-once argument rests on that guarantee (a pair is
decided by exactly one of two concurrent writers), and so do the tests that check it.

What this launcher guarantees: every request is applied while holding one process-wide lock, so
requests are linearizable, for every service (DynamoDB items, Glue's table-version check of an
Iceberg commit, S3 conditional writes). The one exception is SQS `ReceiveMessage`: it may long-poll
(moto sleeps in a loop until a message arrives or `WaitTimeSeconds` pass), so it runs outside the
lock; holding the lock there would stall every other client, including the one whose
`SendMessage` would end the wait. Connections are still served on threads, so a slow client
(reading a response, say) delays nobody; only the application of requests is serialised.

Glue's `UpdateTable` with a `VersionId`: Glue applies it only if the table is still at that
version, and otherwise answers `ConcurrentModificationException` ("Update table failed due to
concurrent modifications.", HTTP 400) and changes nothing. Every Iceberg writer on Glue (Java's
`GlueTableOperations`, pyiceberg, iceberg-rust, adpipe's own commit) relies on that check to never
overwrite another writer's commit; moto ignores the `VersionId`, so here it is enforced as Glue
does (`strict_glue_update_table`).

Everything else is moto's own server (`moto.server.main`): the same dispatcher, backends and
request handler.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import sys
import threading
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.core.exceptions import JsonRESTError
from moto.glue.responses import GlueResponse
from werkzeug.serving import run_simple

SIGNING_SERVICE = re.compile(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/aws4_request")


def may_wait(environ: dict[str, Any]) -> bool:
    """Whether the request is one that may block on purpose (an SQS long poll)."""
    scope = SIGNING_SERVICE.search(environ.get("HTTP_AUTHORIZATION", ""))
    if not scope or scope.group(1) != "sqs":
        return False
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:  # JSON protocol: X-Amz-Target: AmazonSQS.ReceiveMessage
        return target.endswith(".ReceiveMessage")
    # Query protocol: Action=ReceiveMessage in the query string or the form body.
    if "ReceiveMessage" in parse_qs(environ.get("QUERY_STRING", "")).get("Action", []):
        return True
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(body)
    return "ReceiveMessage" in parse_qs(body.decode("utf-8", "replace")).get("Action", [])


class Serialised:
    """WSGI middleware: applies each request under one lock and returns its body whole."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if may_wait(environ):
            return self.app(environ, start_response)
        with self.lock:
            result = self.app(environ, start_response)
            try:
                # Materialise the body inside the lock: a lazily produced body would otherwise
                # read the backend's state after another request changed it.
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        return [body]


class ConcurrentModificationException(JsonRESTError):
    code = 400

    def __init__(self) -> None:
        super().__init__(
            "ConcurrentModificationException",
            "Update table failed due to concurrent modifications.",
        )


def strict_glue_update_table() -> None:
    """Makes moto's Glue `UpdateTable` refuse a stale `VersionId`, as Glue does.

    moto numbers a table's versions from 1 and adds one per update (Glue from 0; clients only
    ever echo what `GetTable` returned). An update without `VersionId` is applied
    unconditionally, as on Glue. The check and the update run under the endpoint's request
    lock, so two updates from the same version cannot both pass.
    """
    original = GlueResponse.update_table

    def update_table(self: GlueResponse) -> Any:
        version = self.parameters.get("VersionId")
        if version is not None:
            name = (self.parameters.get("TableInput") or {}).get("Name")
            table = self.glue_backend.get_table(self.parameters.get("DatabaseName"), name)
            if str(version) != str(table._current_version):
                raise ConcurrentModificationException()
        return original(self)

    GlueResponse.update_table = update_table  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-H", "--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("-p", "--port", type=int, required=True, help="port to bind")
    args = parser.parse_args(argv)
    # moto builds some URLs (SQS queue URLs, for one) from MOTO_PORT, as moto_server sets it.
    os.environ.setdefault("MOTO_PORT", str(args.port))

    strict_glue_update_table()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(
        args.host,
        args.port,
        Serialised(app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
