#!/usr/bin/env python3
"""Launch moto (server mode) for hangar's local cloud, CloudWatch RPCv2-CBOR included.

Why not plain ``moto_server``?  The Rust ``aws-sdk-cloudwatch`` crate now speaks
only the Smithy RPCv2-CBOR protocol, which moto 5.2 does not implement (it
answers 404).  Rather than freeze hangar on an old SDK release, this launcher
builds moto's own WSGI application exactly as ``moto.server`` /
``ThreadedMotoServer`` do (``DomainDispatcherApplication(create_backend_app)``
served with ``MotoRequestHandler``) and puts ``cbor_adapter.CloudWatchCborAdapter``
in front of it; see that module for the translation.  All other services, and
moto's ``/moto-api``, behave exactly as under ``moto_server``.

Usage::

    python server.py --host 127.0.0.1 --port 5000 [--pidfile FILE] [--verbose]

``--port 0`` binds an ephemeral port.  Once the socket is listening, exactly one
line ``ready http://HOST:PORT`` (with the real port) is printed to stdout and
flushed; callers wait for it.  Request logging is off unless ``--verbose``.
SIGTERM/SIGINT stop the server, remove the pidfile and exit with status 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to bind; 0 picks a free one")
    parser.add_argument("--pidfile", help="write this process's PID here; removed on exit")
    parser.add_argument(
        "--verbose", action="store_true", help="log every request and the CBOR<->JSON translation"
    )
    return parser.parse_args(argv)


def _stop(signum: int, frame: FrameType | None) -> None:
    # Raised in the main thread, which is inside serve_forever(): unwinds it
    # so the finally-block below closes the socket and removes the pidfile.
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # --verbose: every CBOR<->JSON translation (but not botocore's DEBUG chatter).
    logging.getLogger("hangar.moto.cbor").setLevel(
        logging.DEBUG if args.verbose else logging.WARNING
    )
    # werkzeug logs each request at INFO on the "werkzeug" logger; errors stay visible.
    logging.getLogger("werkzeug").setLevel(logging.INFO if args.verbose else logging.WARNING)

    pidfile = os.path.abspath(args.pidfile) if args.pidfile else None
    if pidfile:
        with open(pidfile, "w", encoding="ascii") as fh:
            fh.write(f"{os.getpid()}\n")

    server = None
    try:
        # Imported here so a SIGTERM during moto's (slow) import still cleans up.
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        from cbor_adapter import CloudWatchCborAdapter

        app = CloudWatchCborAdapter(DomainDispatcherApplication(create_backend_app))
        server = make_server(
            args.host,
            args.port,
            app,
            threaded=True,
            request_handler=MotoRequestHandler,
        )
        host, port = server.server_address[:2]
        # moto uses MOTO_PORT when it has to call itself (as moto_server sets it).
        os.environ.setdefault("MOTO_PORT", str(port))
        # make_server() has bound and started listening: connections made from
        # now on queue up until serve_forever() accepts them.
        url_host = f"[{host}]" if ":" in str(host) else host
        print(f"ready http://{url_host}:{port}", flush=True)
        server.serve_forever()
    finally:
        if server is not None:
            server.server_close()
        if pidfile:
            try:
                with open(pidfile, encoding="ascii") as fh:
                    mine = fh.read().strip() == str(os.getpid())
                if mine:
                    os.unlink(pidfile)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
