"""WSGI middleware that lets moto answer CloudWatch's Smithy RPCv2-CBOR protocol.

Why this exists
---------------
hangar's local "cloud" is moto in server mode.  Current releases of the Rust
``aws-sdk-cloudwatch`` crate speak **only** the Smithy RPCv2-CBOR protocol
(``smithy.protocols#rpcv2Cbor``): every call is

    POST /service/GraniteServiceVersion20100801/operation/<Operation>
    smithy-protocol: rpc-v2-cbor
    Content-Type: application/cbor       (Accept: application/cbor)
    <CBOR-encoded input structure>

moto 5.2.x only understands the older CloudWatch protocols (awsQuery and
awsJson1_0), so it answers those requests with a 404.  We do not want to pin
hangar to an old SDK release just to keep the emulator happy, so this module
translates on the wire instead and leaves both moto and the SDK unchanged:

* request:  CBOR body -> awsJson1_0 body.  The WSGI environ is rewritten to
  ``POST /`` with ``X-Amz-Target: GraniteServiceVersion20100801.<Operation>``
  and ``Content-Type: application/x-amz-json-1.0``.  The ``Authorization``
  header is kept: moto routes a request to its CloudWatch backend (and picks
  the region) from the SigV4 credential scope (``.../<region>/monitoring/...``).
  A ``Content-Encoding: gzip`` body (the SDK compresses large PutMetricData
  calls, ``requestcompression`` trait) is inflated first.
* response: moto's JSON -> CBOR, serialized *by shape* from botocore's copy of
  the CloudWatch service model, because the Rust decoder is strict and JSON
  loses type information: timestamps become CBOR tag 1 (epoch seconds, int or
  float), doubles are CBOR floats even when integral, integers/longs are CBOR
  ints, blobs are byte strings, ``null`` members are omitted and members not
  in the model are dropped.  Operations whose output is ``Unit`` get an empty
  body, as the protocol requires.
* errors: the Smithy RPCv2-CBOR error body is a CBOR map with ``__type`` (the
  error's absolute shape id; clients keep what follows the ``#``) plus the
  error structure's members, ``message`` included; the HTTP status is kept.
  CloudWatch carries the ``aws.protocols#awsQueryCompatible`` trait, so the
  SDK sends ``x-amzn-query-mode: true`` and takes the error *code* from the
  ``x-amzn-query-error: <Code>;<Sender|Receiver>`` response header when it is
  present (``aws_query_compatible_errors.rs``).  The Rust SDK matches its
  typed errors on those awsQuery codes (``"ResourceNotFound"``,
  ``"InvalidParameterValue"``, ...), not on shape names, so this header is
  always set: moto's own value is forwarded, or one is derived from the model.

Everything that does not match the RPCv2 path (every other service, moto's
``/moto-api``) is passed through to moto untouched.

Wire details checked against: the Smithy RPCv2 CBOR spec, botocore's
``RpcV2CBORSerializer`` / ``RpcV2CBORParser``, and the Rust side
(``aws-sdk-cloudwatch`` ``protocol_serde`` / ``cbor_errors.rs`` and
``aws-smithy-cbor`` ``decode.rs``).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import datetime as _dt
import gzip
import http
import io
import json
import logging
import re
import traceback
import zlib
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

import cbor2
from botocore.loaders import Loader
from botocore.model import ServiceModel, Shape
from botocore.utils import parse_timestamp
from werkzeug.wsgi import get_input_stream

log = logging.getLogger("hangar.moto.cbor")

#: Smithy service shape name of CloudWatch; also its awsJson ``targetPrefix``.
SERVICE_NAME = "GraniteServiceVersion20100801"
#: Smithy namespace of the CloudWatch model, used to build absolute error ids.
SMITHY_NAMESPACE = "com.amazonaws.cloudwatch"

CBOR_CONTENT_TYPE = "application/cbor"
JSON_CONTENT_TYPE = "application/x-amz-json-1.0"
SMITHY_PROTOCOL_HEADER = "smithy-protocol"
SMITHY_PROTOCOL = "rpc-v2-cbor"
QUERY_ERROR_HEADER = "x-amzn-query-error"

# ``{prefix?}/service/{serviceName}/operation/{operationName}``.  Per the spec a
# server should also accept the absolute service id with ``#`` written as ``.``
# (``com.amazonaws.cloudwatch.GraniteServiceVersion20100801``).
_PATH_RE = re.compile(
    r"^(?:/.*)?/service/(?:[A-Za-z0-9_.]+\.)?"
    + re.escape(SERVICE_NAME)
    + r"/operation/([A-Za-z0-9_]+)/?$"
)

# Response headers of moto that must not leak into the CBOR response: they
# describe moto's JSON body, or are bookkeeping moto leaves in the header map.
_DROPPED_RESPONSE_HEADERS = {
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "x-amzn-errortype",  # the spec says clients MUST ignore it; don't send it
    "status",
}

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class AdapterError(Exception):
    """A failure to translate, reported to the client as a CBOR error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def load_service_model() -> ServiceModel:
    """botocore's CloudWatch model (the same data boto3 uses)."""
    model = Loader().load_service_model("cloudwatch", "service-2")
    return ServiceModel(model, service_name="cloudwatch")


# --------------------------------------------------------------------------
# Request side: CBOR value -> awsJson1_0 value
# --------------------------------------------------------------------------


def epoch_seconds(value: _dt.datetime) -> int | float:
    """Epoch seconds for a datetime, at the protocol's millisecond resolution."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.UTC)
    seconds = calendar.timegm(value.utctimetuple())
    millis = value.microsecond // 1000
    return seconds + millis / 1000 if millis else seconds


def cbor_to_json(value: Any) -> Any:
    """Convert a decoded CBOR request value to its awsJson1_0 equivalent.

    No shape is needed on this side: cbor2 has already turned tag-1 timestamps
    into ``datetime`` objects (JSON wants epoch seconds) and byte strings only
    occur for blob members (JSON wants base64 text).  ``null``/``undefined``
    members are dropped, as the protocol says they mean "absent".
    """
    if value is None or value is cbor2.undefined:
        return None
    if isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            converted = cbor_to_json(item)
            if converted is not None:
                out[str(key)] = converted
        return out
    if isinstance(value, list | tuple):
        return [cbor_to_json(item) for item in value]
    if isinstance(value, _dt.datetime):
        return epoch_seconds(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, Decimal):  # tag 4 (bigDecimal); unused by CloudWatch
        return float(value)
    if isinstance(value, cbor2.CBORTag):
        if value.tag == 1:
            return value.value
        return cbor_to_json(value.value)
    raise AdapterError(
        400,
        "SerializationException",
        f"unsupported CBOR value of type {type(value).__name__} in request",
    )


# --------------------------------------------------------------------------
# Response side: JSON value -> CBOR-ready Python value, driven by the model
# --------------------------------------------------------------------------


def _timestamp_tag(value: Any) -> cbor2.CBORTag:
    """CBOR tag 1 around epoch seconds: an int when whole, else a float."""
    if isinstance(value, bool):
        raise TypeError("boolean is not a timestamp")
    if isinstance(value, int | float):
        seconds: int | float = value
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = epoch_seconds(parse_timestamp(value))
    elif isinstance(value, _dt.datetime):
        seconds = epoch_seconds(value)
    else:
        raise TypeError(f"cannot make a timestamp of {type(value).__name__}")
    if isinstance(seconds, float) and seconds.is_integer():
        seconds = int(seconds)
    return cbor2.CBORTag(1, seconds)


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise TypeError(f"{value!r} is not integral")
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            return _as_int(float(text))
    raise TypeError(f"cannot make an integer of {type(value).__name__}")


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("boolean is not a number")
    if isinstance(value, int | float | Decimal):
        return float(value)
    if isinstance(value, str):  # also covers "NaN" / "Infinity" / "-Infinity"
        return float(value)
    raise TypeError(f"cannot make a float of {type(value).__name__}")


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise TypeError(f"cannot make a boolean of {value!r}")


def _as_blob(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise TypeError(f"blob is not valid base64: {exc}") from exc
    raise TypeError(f"cannot make a blob of {type(value).__name__}")


def json_to_cbor(value: Any, shape: Shape, path: str = "$") -> Any:
    """Convert a JSON value to what cbor2 must encode for ``shape``.

    Returns ``None`` for absent values; callers omit those members.  Raises
    ``TypeError`` (with the JSON path) when the value cannot have the type.
    """
    if value is None:
        return None
    kind = shape.type_name
    try:
        if kind == "structure":
            if not isinstance(value, Mapping):
                raise TypeError(f"expected an object, got {type(value).__name__}")
            out = {}
            for name, member in shape.members.items():
                converted = json_to_cbor(value.get(name), member, f"{path}.{name}")
                if converted is not None:
                    out[name] = converted
            unknown = set(value) - set(shape.members)
            if unknown:
                log.debug("%s: dropping members not in the model: %s", path, sorted(unknown))
            return out
        if kind == "list":
            if not isinstance(value, list | tuple):
                raise TypeError(f"expected an array, got {type(value).__name__}")
            items = (json_to_cbor(v, shape.member, f"{path}[{i}]") for i, v in enumerate(value))
            return [item for item in items if item is not None]
        if kind == "map":
            if not isinstance(value, Mapping):
                raise TypeError(f"expected an object, got {type(value).__name__}")
            out = {}
            for key, item in value.items():
                converted = json_to_cbor(item, shape.value, f"{path}[{key!r}]")
                if converted is not None:
                    out[str(key)] = converted
            return out
        if kind == "timestamp":
            return _timestamp_tag(value)
        if kind in ("double", "float"):
            return _as_float(value)
        if kind in ("integer", "long", "short", "byte"):
            return _as_int(value)
        if kind == "boolean":
            return _as_bool(value)
        if kind == "blob":
            return _as_blob(value)
        if kind == "string":
            if isinstance(value, str):
                return value
            if isinstance(value, bool | int | float):
                return json.dumps(value)
            raise TypeError(f"expected a string, got {type(value).__name__}")
    except (TypeError, ValueError, OverflowError) as exc:
        if str(exc).startswith("$"):
            raise
        raise TypeError(f"{path} ({shape.name}: {kind}): {exc}") from exc
    raise TypeError(f"{path}: unsupported shape type {kind!r} ({shape.name})")


def dumps(value: Any) -> bytes:
    """Encode with definite lengths; floats come out as 64-bit doubles."""
    return cbor2.dumps(value)


# --------------------------------------------------------------------------
# The middleware
# --------------------------------------------------------------------------


class _Captured:
    """What the inner app handed to ``start_response`` plus its body."""

    def __init__(self) -> None:
        self.status = 500
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        self.status = int(status.split(None, 1)[0])
        self.headers = list(headers)
        return self.chunks.append

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


def _status_line(status: int) -> str:
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _sanitize_code(code: str) -> str:
    """Same rule as the SDKs: drop a ``:url`` suffix and a ``namespace#`` prefix."""
    code = code.split(":", 1)[0]
    return code.rsplit("#", 1)[-1]


_XML_CODE_RE = re.compile(r"<Code>([^<]+)</Code>")
_XML_MESSAGE_RE = re.compile(r"<Message>([^<]*)</Message>")


class CloudWatchCborAdapter:
    """WSGI middleware: Smithy RPCv2-CBOR in front of moto's awsJson1_0 CloudWatch."""

    def __init__(self, app: WSGIApp, service_model: ServiceModel | None = None) -> None:
        self.app = app
        self.model = service_model or load_service_model()
        self.operations = frozenset(self.model.operation_names)
        # Exception shapes by shape name and by awsQuery error code.
        self.error_shapes: dict[str, Shape] = {}
        self.error_shapes_by_code: dict[str, Shape] = {}
        for name in self.model.shape_names:
            shape = self.model.shape_for(name)
            if shape.metadata.get("exception"):
                self.error_shapes[name] = shape
                code = shape.metadata.get("error", {}).get("code")
                if code:
                    self.error_shapes_by_code.setdefault(code, shape)

    # -- WSGI entry point -------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        match = _PATH_RE.match(environ.get("PATH_INFO", "") or "")
        if match is None:
            return self.app(environ, start_response)
        operation = match.group(1)
        try:
            status, headers, body = self._handle(environ, operation)
        except AdapterError as exc:
            log.info("%s: %s %s: %s", operation, exc.status, exc.code, exc.message)
            status, headers, body = self._error(exc.status, exc.code, exc.message)
        except Exception as exc:  # never let a translation bug become an HTML page
            log.error("%s: adapter failure\n%s", operation, traceback.format_exc())
            status, headers, body = self._error(500, "InternalFailure", f"cbor adapter: {exc}")
        headers.append(("Content-Length", str(len(body))))
        start_response(_status_line(status), headers)
        return [body]

    # -- request translation ----------------------------------------------

    def _handle(
        self, environ: dict[str, Any], operation: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        if environ.get("REQUEST_METHOD", "GET").upper() != "POST":
            raise AdapterError(405, "MethodNotAllowed", "rpcv2Cbor requests must use POST")
        if operation not in self.operations:
            raise AdapterError(404, "UnknownOperationException", f"unknown operation {operation}")

        raw = get_input_stream(environ).read()
        encoding = (environ.get("HTTP_CONTENT_ENCODING") or "").strip().lower()
        if encoding == "gzip":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as exc:
                raise AdapterError(400, "SerializationException", f"bad gzip body: {exc}") from exc
        elif encoding not in ("", "identity"):
            raise AdapterError(
                415, "UnsupportedMediaType", f"unsupported Content-Encoding {encoding!r}"
            )

        if raw:
            try:
                decoded = cbor2.loads(raw)
            except Exception as exc:
                raise AdapterError(
                    400, "SerializationException", f"malformed CBOR body: {exc}"
                ) from exc
            if not isinstance(decoded, Mapping):
                raise AdapterError(400, "SerializationException", "CBOR body is not a map")
        else:
            decoded = {}  # Unit input: the client sends no body at all
        params = cbor_to_json(decoded)
        json_body = json.dumps(params).encode("utf-8")
        log.debug("%s request: %s", operation, json_body[:2000])

        inner = dict(environ)
        inner.update(
            {
                "REQUEST_METHOD": "POST",
                "PATH_INFO": "/",
                "QUERY_STRING": "",
                "REQUEST_URI": "/",
                "RAW_URI": "/",
                "CONTENT_TYPE": JSON_CONTENT_TYPE,
                "CONTENT_LENGTH": str(len(json_body)),
                "HTTP_X_AMZ_TARGET": f"{SERVICE_NAME}.{operation}",
                "HTTP_ACCEPT": JSON_CONTENT_TYPE,
                "wsgi.input": io.BytesIO(json_body),
            }
        )
        for key in (
            "HTTP_CONTENT_ENCODING",
            "HTTP_TRANSFER_ENCODING",
            "HTTP_SMITHY_PROTOCOL",
            "wsgi.input_terminated",
        ):
            inner.pop(key, None)

        captured = self._call_inner(inner, operation)
        return self._translate_response(operation, captured)

    def _call_inner(self, environ: dict[str, Any], operation: str) -> _Captured:
        captured = _Captured()
        try:
            result = self.app(environ, captured.start_response)
            try:
                for chunk in result:
                    captured.chunks.append(chunk)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except NotImplementedError as exc:
            raise AdapterError(501, "NotImplemented", f"moto: {exc}") from exc
        except AdapterError:
            raise
        except Exception as exc:
            log.error("%s: moto raised\n%s", operation, traceback.format_exc())
            raise AdapterError(
                500, "InternalFailure", f"moto raised {type(exc).__name__}: {exc}"
            ) from exc
        return captured

    # -- response translation ---------------------------------------------

    def _translate_response(
        self, operation: str, captured: _Captured
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        body = b"".join(captured.chunks)
        log.debug("%s response %s: %s", operation, captured.status, body[:2000])
        passthrough = [
            (k, v) for k, v in captured.headers if k.lower() not in _DROPPED_RESPONSE_HEADERS
        ]

        if 200 <= captured.status < 300:
            output_shape = self.model.operation_model(operation).output_shape
            headers = [*passthrough, (SMITHY_PROTOCOL_HEADER, SMITHY_PROTOCOL)]
            if output_shape is None:
                return 200, headers, b""  # Unit output: no body, no Content-Type
            try:
                parsed = json.loads(body) if body.strip() else {}
            except ValueError as exc:
                raise AdapterError(
                    500,
                    "InternalFailure",
                    f"moto returned a non-JSON {operation} response: {body[:200]!r}",
                ) from exc
            try:
                value = json_to_cbor(parsed, output_shape)
            except TypeError as exc:
                raise AdapterError(
                    500, "InternalFailure", f"cannot encode moto's {operation} output: {exc}"
                ) from exc
            headers.append(("Content-Type", CBOR_CONTENT_TYPE))
            return 200, headers, dumps(value)

        return self._translate_error(captured, body, passthrough)

    def _translate_error(
        self, captured: _Captured, body: bytes, passthrough: list[tuple[str, str]]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        status = captured.status
        fields: dict[str, Any] = {}
        code = message = None
        try:
            parsed = json.loads(body) if body.strip() else {}
            if isinstance(parsed, Mapping):
                fields = dict(parsed)
                code = fields.get("__type") or fields.get("code") or fields.get("Code")
                message = (
                    fields.get("message") or fields.get("Message") or fields.get("errorMessage")
                )
        except ValueError:
            text = body.decode("utf-8", "replace")
            if found := _XML_CODE_RE.search(text):  # moto's awsQuery / auth errors
                code = found.group(1)
                msg = _XML_MESSAGE_RE.search(text)
                message = msg.group(1) if msg else None
            else:
                message = text.strip()[:500] or None
        code = code or captured.header("x-amzn-errortype")
        if not code:
            code = {400: "BadRequest", 403: "AccessDenied", 404: "NotFound"}.get(
                status, "InternalFailure" if status >= 500 else "BadRequest"
            )
        code = _sanitize_code(str(code))
        message = None if message is None else str(message)
        query_error = [v for k, v in passthrough if k.lower() == QUERY_ERROR_HEADER]
        headers = [(k, v) for k, v in passthrough if k.lower() != QUERY_ERROR_HEADER]
        return self._error(
            status, code, message, fields, query_error[0] if query_error else None, headers
        )

    def _error(
        self,
        status: int,
        code: str,
        message: str | None,
        fields: Mapping[str, Any] | None = None,
        query_error: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """A Smithy RPCv2-CBOR error response.

        ``__type`` is the absolute shape id for modeled errors (bare code
        otherwise); the error structure's members are encoded by shape and
        ``message`` is always present when known.  ``x-amzn-query-error``
        carries the awsQuery code the SDK matches typed errors on.
        """
        shape = self.error_shapes.get(code) or self.error_shapes_by_code.get(code)
        out: dict[str, Any] = {}
        if shape is not None:
            error_meta = shape.metadata.get("error", {})
            out["__type"] = f"{SMITHY_NAMESPACE}#{shape.name}"
            query_code = error_meta.get("code") or shape.name
            # Smithy @error("client") is botocore's senderFault; "server" errors carry fault.
            sender = bool(error_meta.get("senderFault")) or not shape.metadata.get(
                "fault", status >= 500
            )
            if fields:
                # moto writes both "message" and "Message"; match members case-insensitively.
                lowered = {str(k).lower(): v for k, v in fields.items()}
                for name, member in shape.members.items():
                    value = fields.get(name, lowered.get(name.lower()))
                    try:
                        converted = json_to_cbor(value, member, f"$.{name}")
                    except TypeError:
                        converted = None
                    if converted is not None:
                        out[name] = converted
            message_key = next((n for n in shape.members if n.lower() == "message"), "message")
        else:
            out["__type"] = code
            query_code = code
            sender = status < 500
            message_key = "message"
        if message is not None and message_key not in out:
            out[message_key] = message
        if query_error is None or ";" not in query_error:
            query_error = f"{query_code};{'Sender' if sender else 'Receiver'}"
        response_headers = list(headers or [])
        response_headers += [
            (SMITHY_PROTOCOL_HEADER, SMITHY_PROTOCOL),
            ("Content-Type", CBOR_CONTENT_TYPE),
            (QUERY_ERROR_HEADER, query_error),
        ]
        return status, response_headers, dumps(out)


def wrap(app: WSGIApp) -> CloudWatchCborAdapter:
    """Convenience: ``wrap(moto_app)`` -> RPCv2-CBOR capable app."""
    return CloudWatchCborAdapter(app)


__all__ = [
    "CloudWatchCborAdapter",
    "AdapterError",
    "cbor_to_json",
    "json_to_cbor",
    "load_service_model",
    "wrap",
]
