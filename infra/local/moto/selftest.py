#!/usr/bin/env python3
"""Self-check for ``server.py`` + ``cbor_adapter.py`` (moto with CloudWatch RPCv2-CBOR).

Starts ``server.py`` as a subprocess on a free 127.0.0.1 port, waits for its
``ready http://HOST:PORT`` line, then speaks raw Smithy RPCv2-CBOR over HTTP
(urllib + cbor2), the way the Rust ``aws-sdk-cloudwatch`` crate does:

* PutMetricData with dimensions, tag-1 timestamps (int and float), Value and
  Values/Counts, sent with indefinite-length CBOR containers like the Rust SDK;
  once more gzip-compressed (``Content-Encoding: gzip``, as the SDK does for
  large bodies);
* GetMetricData (Sum and SampleCount over 60 s periods) checking the values and
  that Timestamps are CBOR tag 1 and Values are CBOR floats *on the wire*
  (responses are read with the strict decoder below, not with cbor2, whose
  semantic decoding would hide how a value was encoded);
* GetMetricStatistics and ListMetrics;
* errors: a GetMetricData validation error, an unknown dashboard, an unknown
  operation and a malformed body, checking status, ``__type``, ``message`` and
  the ``x-amzn-query-error`` header the SDK takes error codes from;
* that non-CBOR traffic (awsJson1_0) still reaches moto untouched;
* as a second opinion, boto3 forced onto its own RPCv2-CBOR implementation.

The server is stopped with SIGTERM by PID at the end (SIGKILL if it lingers),
also on failure.  Exit status is 0 only if every check passed.

    python infra/local/moto/selftest.py [--verbose]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from datetime import UTC
from typing import Any, NamedTuple

import cbor2

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "server.py")
SERVICE = "GraniteServiceVersion20100801"
REGION = "us-east-1"
# moto ignores the signature but routes on the SigV4 credential scope:
# <key>/<date>/<region>/<signing name>/aws4_request, signing name "monitoring".
AUTH = (
    f"AWS4-HMAC-SHA256 Credential=AKIDSELFTEST/20260101/{REGION}/monitoring/aws4_request, "
    "SignedHeaders=host, Signature=0"
)
NAMESPACE = "Hangar/SelfTest"
INSTANCE = "i-0123456789abcdef0"


# --------------------------------------------------------------------------
# A small strict CBOR decoder: keeps tags and float-vs-int visible.
# --------------------------------------------------------------------------


class Tagged(NamedTuple):
    tag: int
    value: Any


class CborError(ValueError):
    pass


_BREAK = object()


def strict_loads(data: bytes) -> Any:
    value, pos = _item(data, 0)
    if value is _BREAK:
        raise CborError("stray break code")
    if pos != len(data):
        raise CborError(f"{len(data) - pos} trailing bytes")
    return value


def _arg(data: bytes, pos: int, info: int) -> tuple[int | None, int]:
    if info < 24:
        return info, pos
    sizes = {24: 1, 25: 2, 26: 4, 27: 8}
    if info in sizes:
        n = sizes[info]
        if pos + n > len(data):
            raise CborError("truncated")
        return int.from_bytes(data[pos : pos + n], "big"), pos + n
    if info == 31:
        return None, pos
    raise CborError(f"reserved additional info {info}")


def _item(data: bytes, pos: int) -> tuple[Any, int]:
    if pos >= len(data):
        raise CborError("truncated")
    initial = data[pos]
    pos += 1
    major, info = initial >> 5, initial & 0x1F
    if major == 7:
        simple = {20: False, 21: True, 22: None}
        if info in simple:
            return simple[info], pos
        if info == 23:
            raise CborError("servers must not send `undefined`")
        formats = {25: (">e", 2), 26: (">f", 4), 27: (">d", 8)}
        if info in formats:
            fmt, n = formats[info]
            return struct.unpack(fmt, data[pos : pos + n])[0], pos + n
        if info == 31:
            return _BREAK, pos
        raise CborError(f"unsupported simple value {info}")
    n, pos = _arg(data, pos, info)
    if major == 0:
        return n, pos
    if major == 1:
        return -1 - n, pos
    if major in (2, 3):
        if n is None:
            chunks = []
            while True:
                chunk, pos = _item(data, pos)
                if chunk is _BREAK:
                    break
                chunks.append(chunk)
            return (b"" if major == 2 else "").join(chunks), pos
        raw = data[pos : pos + n]
        if len(raw) != n:
            raise CborError("truncated string")
        return (bytes(raw) if major == 2 else raw.decode("utf-8")), pos + n
    if major == 4:
        out = []
        while n is None or len(out) < n:
            value, pos = _item(data, pos)
            if value is _BREAK:
                if n is not None:
                    raise CborError("break inside definite array")
                break
            out.append(value)
        return out, pos
    if major == 5:
        result: dict[str, Any] = {}
        count = 0
        while n is None or count < n:
            key, pos = _item(data, pos)
            if key is _BREAK:
                if n is not None:
                    raise CborError("break inside definite map")
                break
            if not isinstance(key, str):
                raise CborError(f"map key {key!r} is not a text string")
            value, pos = _item(data, pos)
            result[key] = value
            count += 1
        return result, pos
    if major == 6:
        value, pos = _item(data, pos)
        return Tagged(n, value), pos
    raise CborError(f"bad major type {major}")


# --------------------------------------------------------------------------
# HTTP helpers
# --------------------------------------------------------------------------


class Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


HTTP_TIMEOUT = 20.0


def post(url: str, data: bytes, headers: dict[str, str]) -> Reply:
    req = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


def rpc(
    base: str,
    operation: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    gzipped: bool = False,
    indefinite: bool = False,
) -> Reply:
    """One Smithy RPCv2-CBOR call, headers as the Rust SDK sends them."""
    headers = {
        "smithy-protocol": "rpc-v2-cbor",
        "Accept": "application/cbor",
        "x-amzn-query-mode": "true",
        "Authorization": AUTH,
    }
    if raw is None:
        raw = b"" if body is None else cbor2.dumps(body, indefinite_containers=indefinite)
    if raw:
        headers["Content-Type"] = "application/cbor"
    if gzipped:
        raw = gzip.compress(raw)
        headers["Content-Encoding"] = "gzip"
    return post(f"{base}/service/{SERVICE}/operation/{operation}", raw, headers)


def ts(seconds: float) -> cbor2.CBORTag:
    return cbor2.CBORTag(1, seconds)


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


class CheckFailed(AssertionError):
    pass


def check(cond: Any, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def expect_ok(reply: Reply, what: str, *, empty: bool = False) -> Any:
    check(reply.status == 200, f"{what}: HTTP {reply.status}, body {reply.body[:300]!r}")
    check(
        reply.headers.get("smithy-protocol") == "rpc-v2-cbor",
        f"{what}: smithy-protocol header {reply.headers.get('smithy-protocol')!r}",
    )
    if empty:
        check(
            reply.body == b"",
            f"{what}: Unit output must have an empty body, got {reply.body[:100]!r}",
        )
        check("content-type" not in reply.headers, f"{what}: Unit output must not set Content-Type")
        return None
    check(
        reply.headers.get("content-type") == "application/cbor",
        f"{what}: Content-Type {reply.headers.get('content-type')!r}",
    )
    value = strict_loads(reply.body)
    check(isinstance(value, dict), f"{what}: body is not a CBOR map: {value!r}")
    return value


def expect_error(
    reply: Reply,
    what: str,
    status: int,
    type_suffix: str,
    query_error: str,
    message_part: str | None = None,
) -> dict:
    check(
        reply.status == status,
        f"{what}: expected HTTP {status}, got {reply.status} {reply.body[:300]!r}",
    )
    check(
        reply.headers.get("smithy-protocol") == "rpc-v2-cbor",
        f"{what}: smithy-protocol header missing",
    )
    check(
        reply.headers.get("content-type") == "application/cbor",
        f"{what}: Content-Type {reply.headers.get('content-type')!r}",
    )
    check(
        reply.headers.get("x-amzn-query-error") == query_error,
        f"{what}: x-amzn-query-error {reply.headers.get('x-amzn-query-error')!r} != {query_error!r}",
    )
    check("x-amzn-errortype" not in reply.headers, f"{what}: X-Amzn-ErrorType must not be sent")
    body = strict_loads(reply.body)
    check(isinstance(body, dict), f"{what}: error body is not a map")
    type_ = body.get("__type")
    check(
        isinstance(type_, str) and (type_ == type_suffix or type_.endswith("#" + type_suffix)),
        f"{what}: __type {type_!r}, want …{type_suffix}",
    )
    msg = body.get("message")
    check(isinstance(msg, str), f"{what}: no string `message` in {body!r}")
    if message_part:
        check(message_part in msg, f"{what}: message {msg!r} lacks {message_part!r}")
    return body


def is_f(value: Any) -> bool:
    return isinstance(value, float)


def tag1(value: Any, what: str) -> float:
    check(
        isinstance(value, Tagged) and value.tag == 1,
        f"{what}: {value!r} is not a CBOR tag-1 timestamp",
    )
    check(
        isinstance(value.value, int | float) and not isinstance(value.value, bool),
        f"{what}: tag-1 payload {value.value!r} is not a number",
    )
    return float(value.value)


def dims(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"Name": n, "Value": v} for n, v in pairs]


class SelfTest:
    def __init__(self, base: str) -> None:
        self.base = base
        # Ten minutes ago, on a minute boundary: moto's GetMetricData buckets
        # start at StartTime, so an aligned StartTime makes buckets predictable.
        self.t0 = int(time.time()) // 60 * 60 - 600

    def put_metric_data(self) -> None:
        t0 = self.t0
        both = dims(("InstanceId", INSTANCE), ("Pool", "web"))
        body = {
            "Namespace": NAMESPACE,
            "MetricData": [
                {
                    "MetricName": "CPUUtilization",
                    "Dimensions": both,
                    "Timestamp": ts(t0 + 5.25),
                    "Value": 10.0,
                    "Unit": "Percent",
                },
                {
                    "MetricName": "CPUUtilization",
                    "Dimensions": both,
                    "Timestamp": ts(t0 + 30),
                    "Values": [1.5, 2.5],
                    "Counts": [1.0, 2.0],
                    "Unit": "Percent",
                },
                {
                    "MetricName": "CPUUtilization",
                    "Dimensions": both,
                    "Timestamp": ts(t0 + 65.5),
                    "Value": 4.0,
                    "Unit": "Percent",
                },
                # Same name, a different dimension set: must not be summed in.
                {
                    "MetricName": "CPUUtilization",
                    "Dimensions": dims(("InstanceId", INSTANCE)),
                    "Timestamp": ts(t0 + 5),
                    "Value": 1000.0,
                    "Unit": "Percent",
                },
                {
                    "MetricName": "MemoryUtilization",
                    "Dimensions": both,
                    "Timestamp": ts(t0 + 10),
                    "Value": 50.0,
                    "Unit": "Percent",
                },
            ],
        }
        expect_ok(
            rpc(self.base, "PutMetricData", body, indefinite=True), "PutMetricData", empty=True
        )

    def put_metric_data_gzip(self) -> None:
        body = {
            "Namespace": NAMESPACE,
            "MetricData": [
                {
                    "MetricName": "Gzipped",
                    "Dimensions": dims(("Pool", "web")),
                    "Timestamp": ts(self.t0 + 1),
                    "Value": 1.0,
                }
            ],
        }
        expect_ok(
            rpc(self.base, "PutMetricData", body, gzipped=True), "PutMetricData (gzip)", empty=True
        )

    def get_metric_data(self) -> None:
        t0 = self.t0
        # Dimensions in the same order as PutMetricData: moto's matching is
        # order-sensitive (see moto_quirks()).
        metric = {
            "Namespace": NAMESPACE,
            "MetricName": "CPUUtilization",
            "Dimensions": dims(("InstanceId", INSTANCE), ("Pool", "web")),
        }
        body = {
            "StartTime": ts(t0),
            "EndTime": ts(t0 + 120),
            "ScanBy": "TimestampAscending",
            "MetricDataQueries": [
                {
                    "Id": "cpu",
                    "MetricStat": {"Metric": metric, "Period": 60, "Stat": "Sum"},
                    "ReturnData": True,
                },
                {"Id": "n", "MetricStat": {"Metric": metric, "Period": 60, "Stat": "SampleCount"}},
            ],
        }
        out = expect_ok(rpc(self.base, "GetMetricData", body), "GetMetricData")
        results = {r.get("Id"): r for r in out.get("MetricDataResults", [])}
        check(set(results) == {"cpu", "n"}, f"GetMetricData: result ids {sorted(results)}")
        cpu = results["cpu"]
        stamps = [tag1(t, "GetMetricData Timestamps") for t in cpu.get("Timestamps", [])]
        check(stamps == [t0, t0 + 60], f"GetMetricData: Timestamps {stamps} != {[t0, t0 + 60]}")
        values = cpu.get("Values", [])
        check(
            all(is_f(v) for v in values),
            f"GetMetricData: Values must be CBOR floats, got {values!r}",
        )
        # Sum = Σ value×count: 10 + 1.5×1 + 2.5×2 in the first minute, 4 in the second.
        check(values == [16.5, 4.0], f"GetMetricData: Sum values {values} != [16.5, 4.0]")
        check(
            cpu.get("StatusCode") == "Complete",
            f"GetMetricData: StatusCode {cpu.get('StatusCode')!r}",
        )
        check(
            cpu.get("Label") == "CPUUtilization Sum", f"GetMetricData: Label {cpu.get('Label')!r}"
        )
        n = results["n"]
        check(
            n.get("Values") == [4.0, 1.0] and all(is_f(v) for v in n["Values"]),
            f"GetMetricData: SampleCount {n.get('Values')!r} != [4.0, 1.0]",
        )
        check(
            all(
                k in ("Id", "Label", "Timestamps", "Values", "StatusCode", "Messages") for k in cpu
            ),
            f"GetMetricData: unexpected members {sorted(cpu)}",
        )

    def get_metric_statistics(self) -> None:
        t0 = self.t0
        body = {
            "Namespace": NAMESPACE,
            "MetricName": "CPUUtilization",
            "Dimensions": dims(("InstanceId", INSTANCE), ("Pool", "web")),
            "StartTime": ts(t0),
            "EndTime": ts(t0 + 120),
            "Period": 60,
            "Statistics": ["Sum", "Maximum"],
        }
        out = expect_ok(rpc(self.base, "GetMetricStatistics", body), "GetMetricStatistics")
        check(
            out.get("Label") == "CPUUtilization", f"GetMetricStatistics: Label {out.get('Label')!r}"
        )
        points = out.get("Datapoints", [])
        check(points, "GetMetricStatistics: no datapoints")
        for p in points:
            tag1(p.get("Timestamp"), "GetMetricStatistics Timestamp")
            check(
                is_f(p.get("Sum")) and is_f(p.get("Maximum")),
                f"GetMetricStatistics: stats must be floats: {p!r}",
            )
        total = sum(p["Sum"] for p in points)
        check(math.isclose(total, 20.5), f"GetMetricStatistics: total Sum {total} != 20.5")

    def list_metrics(self) -> None:
        out = expect_ok(rpc(self.base, "ListMetrics", {"Namespace": NAMESPACE}), "ListMetrics")
        got = set()
        for m in out.get("Metrics", []):  # moto may repeat entries, see moto_quirks()
            check(m.get("Namespace") == NAMESPACE, f"ListMetrics: namespace {m.get('Namespace')!r}")
            dimset = m.get("Dimensions", [])
            check(
                all(set(d) == {"Name", "Value"} for d in dimset),
                f"ListMetrics: dimension members {dimset!r}",
            )
            got.add((m.get("MetricName"), frozenset((d["Name"], d["Value"]) for d in dimset)))
        want = {
            ("CPUUtilization", frozenset({("InstanceId", INSTANCE), ("Pool", "web")})),
            ("CPUUtilization", frozenset({("InstanceId", INSTANCE)})),
            ("MemoryUtilization", frozenset({("InstanceId", INSTANCE), ("Pool", "web")})),
            ("Gzipped", frozenset({("Pool", "web")})),
        }
        check(got == want, f"ListMetrics: got {got}, want {want}")
        # A filter with a dimension *name* only (valid in the API).
        out = expect_ok(
            rpc(
                self.base,
                "ListMetrics",
                {
                    "Namespace": NAMESPACE,
                    "MetricName": "CPUUtilization",
                    "Dimensions": [{"Name": "Pool"}],
                },
            ),
            "ListMetrics (filter)",
        )
        unique = {
            frozenset((d["Name"], d["Value"]) for d in m.get("Dimensions", []))
            for m in out.get("Metrics", [])
        }
        check(
            unique == {frozenset({("InstanceId", INSTANCE), ("Pool", "web")})},
            f"ListMetrics (filter): {out.get('Metrics')!r}",
        )

    def moto_quirks(self) -> None:
        """Report (never fail on) moto 5.2.5 behaviours that differ from AWS.

        Both come from moto.cloudwatch.models, not from the adapter:
        ``Dimension.__lt__`` compares ``self.value < other.name``, so the
        ``sorted(...) == sorted(...)`` in get_metric_data does not normalise
        dimension order; ``are_dimensions_same`` is false for any two metrics
        with 2+ dimensions, so ListMetrics does not de-duplicate them.
        """
        t0 = self.t0
        metric = {
            "Namespace": NAMESPACE,
            "MetricName": "CPUUtilization",
            "Dimensions": dims(("Pool", "web"), ("InstanceId", INSTANCE)),
        }
        body = {
            "StartTime": ts(t0),
            "EndTime": ts(t0 + 120),
            "MetricDataQueries": [
                {"Id": "r", "MetricStat": {"Metric": metric, "Period": 60, "Stat": "Sum"}}
            ],
        }
        out = expect_ok(
            rpc(self.base, "GetMetricData", body), "GetMetricData (reversed dimensions)"
        )
        points = len(out["MetricDataResults"][0].get("Timestamps", []))
        if points == 0:
            print(
                "note moto quirk: GetMetricData with dimensions in a different order than PutMetricData matches nothing",
                flush=True,
            )
        out = expect_ok(
            rpc(self.base, "ListMetrics", {"Namespace": NAMESPACE, "MetricName": "CPUUtilization"}),
            "ListMetrics (dupes)",
        )
        entries = out.get("Metrics", [])
        unique = {
            frozenset((d["Name"], d["Value"]) for d in m.get("Dimensions", [])) for m in entries
        }
        if len(entries) != len(unique):
            print(
                f"note moto quirk: ListMetrics returned {len(entries)} entries for {len(unique)} distinct metrics (one per datapoint for 2+ dimensions)",
                flush=True,
            )

    def errors(self) -> None:
        bad = {
            "StartTime": ts(self.t0),
            "EndTime": ts(self.t0 + 120),
            "MetricDataQueries": [{"Id": "q"}],  # neither MetricStat nor Expression
        }
        expect_error(
            rpc(self.base, "GetMetricData", bad),
            "GetMetricData (invalid)",
            400,
            "ValidationException",
            "ValidationError;Sender",
            "MetricStat",
        )
        # The SDK maps code "ResourceNotFound" (from the header) to DashboardNotFoundError.
        expect_error(
            rpc(self.base, "GetDashboard", {"DashboardName": "no-such-dashboard"}),
            "GetDashboard (missing)",
            404,
            "ResourceNotFound",
            "ResourceNotFound;Sender",
        )
        expect_error(
            rpc(self.base, "NoSuchOperation", {}),
            "unknown operation",
            404,
            "UnknownOperationException",
            "UnknownOperationException;Sender",
        )
        expect_error(
            rpc(self.base, "ListMetrics", raw=b"\xa1\x61"),
            "malformed CBOR",
            400,
            "SerializationException",
            "SerializationException;Sender",
        )

    def json_passthrough(self) -> None:
        reply = post(
            self.base + "/",
            json.dumps({"Namespace": NAMESPACE, "MetricName": "MemoryUtilization"}).encode(),
            {
                "X-Amz-Target": f"{SERVICE}.ListMetrics",
                "Content-Type": "application/x-amz-json-1.0",
                "Authorization": AUTH,
            },
        )
        check(
            reply.status == 200, f"awsJson pass-through: HTTP {reply.status} {reply.body[:200]!r}"
        )
        metrics = json.loads(reply.body).get("Metrics", [])
        check(
            [m["MetricName"] for m in metrics] == ["MemoryUtilization"],
            f"awsJson pass-through: {metrics!r}",
        )

    def boto3_cbor(self) -> None:
        """boto3 on its own RPCv2-CBOR code path, as an independent client."""
        import boto3
        import botocore.model
        from botocore.exceptions import ClientError

        # botocore prefers awsJson for CloudWatch; make it pick rpcv2Cbor.
        botocore.model.PRIORITY_ORDERED_SUPPORTED_PROTOCOLS = ("smithy-rpc-v2-cbor",)
        session = boto3.session.Session(
            aws_access_key_id="AKIDSELFTEST", aws_secret_access_key="x", region_name=REGION
        )
        client = session.client("cloudwatch", endpoint_url=self.base)
        paths: list[str] = []
        client.meta.events.register(
            "before-send.cloudwatch", lambda request, **_: paths.append(request.url)
        )
        from datetime import datetime

        t0 = datetime.fromtimestamp(self.t0, UTC)
        client.put_metric_data(
            Namespace=NAMESPACE,
            MetricData=[
                {
                    "MetricName": "Boto",
                    "Dimensions": dims(("Pool", "web")),
                    "Timestamp": datetime.fromtimestamp(self.t0 + 2, UTC),
                    "Value": 7.0,
                }
            ],
        )
        resp = client.get_metric_data(
            StartTime=t0,
            EndTime=datetime.fromtimestamp(self.t0 + 60, UTC),
            MetricDataQueries=[
                {
                    "Id": "b",
                    "MetricStat": {
                        "Metric": {
                            "Namespace": NAMESPACE,
                            "MetricName": "Boto",
                            "Dimensions": dims(("Pool", "web")),
                        },
                        "Period": 60,
                        "Stat": "Sum",
                    },
                }
            ],
        )
        result = resp["MetricDataResults"][0]
        check(
            result["Values"] == [7.0] and result["Timestamps"] == [t0],
            f"boto3 GetMetricData: {result!r}",
        )
        names = {m["MetricName"] for m in client.list_metrics(Namespace=NAMESPACE)["Metrics"]}
        check("Boto" in names, f"boto3 ListMetrics: {names}")
        try:
            client.get_dashboard(DashboardName="no-such-dashboard")
        except ClientError as err:
            check(
                err.response["Error"]["Code"] == "ResourceNotFound",
                f"boto3 error code {err.response['Error']!r}",
            )
        else:
            raise CheckFailed("boto3 GetDashboard: no error raised")
        check(
            paths and all("/service/GraniteServiceVersion20100801/operation/" in p for p in paths),
            f"boto3 did not use RPCv2-CBOR: {paths}",
        )

    def run(self) -> int:
        steps = [
            ("PutMetricData", self.put_metric_data),
            ("PutMetricData gzip", self.put_metric_data_gzip),
            ("GetMetricData", self.get_metric_data),
            ("GetMetricStatistics", self.get_metric_statistics),
            ("ListMetrics", self.list_metrics),
            ("errors", self.errors),
            ("awsJson pass-through", self.json_passthrough),
            ("boto3 RPCv2-CBOR client", self.boto3_cbor),
            ("moto quirks (informational)", self.moto_quirks),
        ]
        failures = 0
        for index, (name, step) in enumerate(steps):
            try:
                step()
            except CheckFailed as exc:
                failures += 1
                print(f"FAIL {name}: {exc}", flush=True)
            except (urllib.error.URLError, OSError) as exc:
                # The server is unreachable or hung: the remaining steps would
                # only pile up timeouts.
                failures += 1 + len(steps) - index - 1
                print(
                    f"FAIL {name}: transport error {exc!r}; skipping the remaining steps",
                    flush=True,
                )
                break
            except Exception:
                failures += 1
                print(f"FAIL {name}: unexpected exception\n{traceback.format_exc()}", flush=True)
            else:
                print(f"ok   {name}", flush=True)
        return failures


# --------------------------------------------------------------------------
# Server process management
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, timeout: float) -> str:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CheckFailed(f"server printed no ready line within {timeout:.0f}s")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            raise CheckFailed(f"server exited early with status {proc.wait()}")
        if line.startswith("ready "):
            return line.split()[1]


def stop(proc: subprocess.Popen, grace: float = 15.0) -> int | None:
    """SIGTERM the server by PID, SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
    return proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description="self-check for the moto CBOR launcher")
    parser.add_argument("--verbose", action="store_true", help="run the server with --verbose")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the ready line"
    )
    args = parser.parse_args()

    # Being stopped (Ctrl-C, `timeout`, a CI cancel) must still run the
    # finally-block below that stops the server.
    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    workdir = tempfile.mkdtemp(prefix="hangar-moto-selftest-")
    pidfile = os.path.join(workdir, "moto.pid")
    errlog_path = os.path.join(workdir, "server.stderr")
    port = free_port()
    cmd = [sys.executable, SERVER, "--host", "127.0.0.1", "--port", str(port), "--pidfile", pidfile]
    if args.verbose:
        cmd.append("--verbose")

    failures = 0
    proc = None
    with open(errlog_path, "w+b") as errlog:
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, text=True)
            base = wait_ready(proc, args.timeout)
            check(
                base == f"http://127.0.0.1:{port}", f"ready line names {base}, expected port {port}"
            )
            with open(pidfile, encoding="ascii") as fh:
                check(fh.read().strip() == str(proc.pid), "pidfile does not hold the server's PID")
            print(f"server up at {base} (pid {proc.pid})", flush=True)
            failures += SelfTest(base).run()
        except KeyboardInterrupt as exc:
            failures += 1
            print(f"FAIL interrupted ({exc})", flush=True)
        except Exception as exc:
            failures += 1
            print(f"FAIL setup: {exc}", flush=True)
        finally:
            if proc is not None:
                code = stop(proc)
                if code != 0:
                    failures += 1
                    print(
                        f"FAIL shutdown: server exit status {code} (None = had to SIGKILL)",
                        flush=True,
                    )
                elif os.path.exists(pidfile):
                    failures += 1
                    print("FAIL shutdown: pidfile left behind", flush=True)
                else:
                    print("ok   SIGTERM shutdown (exit 0, pidfile removed)", flush=True)
            errlog.seek(0)
            stderr = errlog.read().decode("utf-8", "replace")
            if failures and stderr.strip():
                print("---- server stderr (tail) ----\n" + stderr[-4000:], flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    print("PASS" if not failures else f"FAILED: {failures} check(s)", flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
