"""The HTTP gateway's added latency over direct gRPC: N sequential requests each way, one text
or one image each, p50 / p99 side by side.

    python -m tools.gateway_bench                       # a tiny repository built in build/gateway-bench
    python -m tools.gateway_bench --repository DIR      # starts tritonserver on DIR
    python -m tools.gateway_bench --url HOST:PORT [--gateway http://HOST:PORT --api-key KEY]

Without ``--gateway`` it starts the real ``filip-gateway`` command (its own process, as
deployed) against the server.  Direct: ``FilipClient.embed_texts([t])`` /
``embed_images([jpeg])``; gateway: ``POST /v1/embeddings`` on one kept-alive HTTP connection
(``encoding_format`` float, and base64 as the openai client asks by default), the image as a
data URI.  Requests alternate between the two paths so that both see the same server state.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a photo of a cat sitting on a red sofa", "two dogs playing in the snow near a wooden fence",
            "a cup of coffee on a table", "an astronaut standing next to the space shuttle",
            "a busy street at night with neon signs and people walking"]


def _jpeg() -> bytes:
    path = ROOT / "tests" / "goldens" / "images" / "coffee_rgb_640x427.jpg"
    if path.exists():
        return path.read_bytes()
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tiny_repository(out: Path) -> Path:
    repo = out / "triton_models"
    if (repo / "filip_text" / "config.pbtxt").exists():
        return repo
    from filip_engine.checkpoint import random_model, save_checkpoint
    from filip_engine.tokenizer import ClipTokenizer, find_clip_merges_file
    from filip_export.to_trt import main as export_main
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "tiny.pt"
    save_checkpoint(ckpt, random_model("tiny", seed=5), vocab_text=ClipTokenizer.from_file(find_clip_merges_file()).merges_text)
    if export_main([str(ckpt), "--out", str(repo), "--max-batch", "16"]) != 0:
        raise SystemExit("export failed")
    return repo


def _pct(xs: list[float]) -> tuple[float, float]:
    a = np.array(xs) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def run(grpc_url: str, gateway_url: str, api_key: str | None, n: int, warmup: int) -> dict:
    import httpx
    from filip_client import FilipClient
    jpeg = _jpeg()
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    times: dict[str, list[float]] = {}
    with FilipClient(grpc_url, timeout=60) as client, httpx.Client(base_url=gateway_url, headers=headers, timeout=60) as http:
        def direct(kind, i):
            return client.embed_texts([CAPTIONS[i % len(CAPTIONS)]]) if kind == "text" else client.embed_images([jpeg])

        def gateway(kind, i, fmt):
            item = CAPTIONS[i % len(CAPTIONS)] if kind == "text" else uri
            r = http.post("/v1/embeddings", json={"input": [item], "model": "filip", "encoding_format": fmt})
            r.raise_for_status()
            return r.json()

        for kind in ("text", "image"):
            for i in range(warmup):
                direct(kind, i), gateway(kind, i, "float"), gateway(kind, i, "base64")
            for i in range(n):
                for name, fn in ((f"{kind} gRPC", lambda: direct(kind, i)),
                                 (f"{kind} HTTP float", lambda: gateway(kind, i, "float")),
                                 (f"{kind} HTTP base64", lambda: gateway(kind, i, "base64"))):
                    t0 = time.perf_counter()
                    fn()
                    times.setdefault(name, []).append(time.perf_counter() - t0)
    return {k: dict(zip(("p50_ms", "p99_ms"), _pct(v)), n=len(v)) for k, v in times.items()}


def report(res: dict) -> str:
    lines = [f"{'path':<22}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>10}{'+p99 ms':>10}"]
    for kind in ("text", "image"):
        base = res[f"{kind} gRPC"]
        for name in (f"{kind} gRPC", f"{kind} HTTP float", f"{kind} HTTP base64"):
            r = res[name]
            extra = "" if name == f"{kind} gRPC" else f"{r['p50_ms'] - base['p50_ms']:>10.2f}{r['p99_ms'] - base['p99_ms']:>10.2f}"
            lines.append(f"{name:<22}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{extra}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--repository", type=Path, help="start tritonserver on this model repository")
    g.add_argument("--url", help="a running Triton's gRPC HOST:PORT")
    p.add_argument("--gateway", help="a running gateway's base URL (default: start filip-gateway)")
    p.add_argument("--api-key", help="the gateway's key, with --gateway")
    p.add_argument("--requests", type=int, default=200, help="sequential requests per path and kind (200)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args(argv)
    import httpx
    from filip_export.launch import TritonServer, free_ports
    server = None
    if a.url is None:
        repo = a.repository or _tiny_repository(ROOT / "build" / "gateway-bench")
        server = TritonServer(repo).start()
        grpc_url = server.url
    else:
        grpc_url = a.url
    proc = None
    try:
        gateway_url, key = a.gateway, a.api_key
        if gateway_url is None:
            (port,) = free_ports(1)
            exe = Path(sys.executable).parent / "filip-gateway"
            proc = subprocess.Popen([str(exe), "--triton", grpc_url, "--port", str(port), "--log-level", "warning"])
            gateway_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(gateway_url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("filip-gateway did not start")
                time.sleep(0.2)
        res = run(grpc_url, gateway_url, key, a.requests, a.warmup)
        print(f"{a.requests} sequential requests per path, one item each (gRPC {grpc_url}, gateway {gateway_url}):")
        print(report(res))
        if a.json:
            a.json.write_text(json.dumps(res, indent=2))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=15)
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
