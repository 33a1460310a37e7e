"""``filip-gateway --triton HOST:PORT [--host H] [--port N] [--api-key KEY ...] [--cors ORIGIN ...]``"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .app import GatewaySettings, create_app


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="filip-gateway", description="OpenAI-compatible HTTP gateway for the served FILIP models")
    p.add_argument("--triton", default="localhost:8001", help="Triton gRPC address HOST:PORT (default localhost:8001)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this Bearer key on /v1/* (repeatable; also $FILIP_GATEWAY_API_KEYS, comma-separated); "
                        "none: no authentication")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN", help="allow this browser origin (repeatable)")
    p.add_argument("--model-name", default="filip", help="the model id /v1/models lists and responses echo (default filip)")
    p.add_argument("--max-body-mb", type=float, default=64.0,
                   help="cap on request bodies in MiB (default 64); the served limits may make it smaller")
    p.add_argument("--image-root", action="append", default=[], metavar="DIR",
                   help="only read gallery images under this folder (repeatable; default: any recorded path)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per gRPC call (default 60)")
    p.add_argument("--concurrency", type=int, default=32, help="gRPC calls in flight (default 32)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    keys = list(a.api_key) + [k.strip() for k in os.environ.get("FILIP_GATEWAY_API_KEYS", "").split(",") if k.strip()]
    if a.concurrency < 1 or a.max_body_mb <= 0 or not 0 < a.port < 65536:
        print("filip-gateway: --concurrency, --max-body-mb and --port must be positive", file=sys.stderr)
        return 2
    import uvicorn
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(GatewaySettings(triton=a.triton, api_keys=tuple(keys), cors=tuple(a.cors), model_name=a.model_name,
                                     max_body_bytes=int(a.max_body_mb * 1024 * 1024), image_roots=tuple(a.image_root),
                                     timeout=a.timeout, concurrency=a.concurrency))
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
