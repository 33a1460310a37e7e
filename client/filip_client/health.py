"""python -m filip_client.health [--url HOST:PORT] [--deep] [--timeout S]: a probe for orchestrators.

Exit 0 when healthy, 1 when not (one line saying why), 2 when the server cannot be reached.
``--deep`` sends one tiny real request to each model: Triton does not restart a crashed
Python-backend stub and keeps answering its own health endpoints with OK, so a liveness or
readiness probe that must notice a dead model has to run it (e.g. Kubernetes
``livenessProbe: exec: command: [python, -m, filip_client.health, --deep]``).
"""
from __future__ import annotations

import argparse
import sys

from .errors import FilipError
from .sync import FilipClient


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m filip_client.health", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="localhost:8001")
    p.add_argument("--deep", action="store_true", help="also run one tiny request per model")
    p.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args(argv)
    try:
        with FilipClient(args.url, timeout=args.timeout) as c:
            h = c.health(deep=args.deep)
    except FilipError as e:
        print(f"unreachable: {e}")
        return 2
    if h.ok:
        print("ok")
        return 0
    bad = [f"{m} not ready" for m, r in h.models.items() if not r]
    bad += [f"{m}: {why}" for m, why in (h.canaries or {}).items() if why]
    print("unhealthy: " + ("; ".join(bad) or f"live={h.live} ready={h.ready}"))
    return 1


if __name__ == "__main__":
    sys.exit(main())
