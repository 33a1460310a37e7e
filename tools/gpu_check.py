"""One-GPU smoke check, sized for about 5 minutes on one GPU:

1. writes a random ViT-B-32-size checkpoint (``python -m filip_engine.checkpoint init``);
2. exports it with ``export/to_trt.py --runtime auto`` (ONNX, ONNX Runtime gates, and TensorRT
   plans + their gates when TensorRT is installed);
3. in-process parity against the fp32 CPU PyTorch reference through
   ``filip_engine.compare.compare_outputs`` and latency: PyTorch CUDA, ONNX Runtime (CUDA provider
   when onnxruntime-gpu is installed), TensorRT (when plans were built);
4. serves the repository with Triton (``filip_export.launch.TritonServer``) and times
   ``FilipClient.embed_texts`` / ``embed_images`` end to end.

    python tools/gpu_check.py [--workdir DIR] [--precision fp32|fp16]

On a machine without CUDA it prints one line saying why it skipped and exits 0.  Exit 1 when
a parity gate fails or a stage errors (the figures printed up to there stay).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 290.0


def _ms(fn, repeat: int = 20, warmup: int = 3) -> tuple[float, float]:
    """(median, p90) wall milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    t = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t.append((time.perf_counter() - t0) * 1e3)
    t.sort()
    return statistics.median(t), t[int(0.9 * (len(t) - 1))]


def main(argv: list[str] | None = None) -> int:
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device is visible (torch.cuda.is_available() is False)")
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp16")
    p.add_argument("--no-serve", action="store_true", help="skip the Triton stage")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="filip-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: {torch.cuda.get_device_name(0)} (sm{''.join(map(str, torch.cuda.get_device_capability(0)))}), "
          f"torch {torch.__version__}, workdir {work}", flush=True)
    failed = []

    ckpt = work / "vit_b32_random.pt"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "filip_engine.checkpoint", "init", "--preset", "ViT-B-32", "--out", str(ckpt)],
                   cwd=ROOT, check=True)
    print(f"[1/4] checkpoint {ckpt} ({time.perf_counter() - t:.1f} s)", flush=True)

    repo = work / "repo"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "export/to_trt.py", str(ckpt), "--out", str(repo), "--runtime", "auto",
                        "--precision", args.precision, "--max-batch", "32"], cwd=ROOT, capture_output=True, text=True)
    print("\n".join("      " + ln for ln in r.stdout.splitlines()))
    print(f"[2/4] export/to_trt.py exit {r.returncode} ({time.perf_counter() - t:.1f} s) {r.stderr.strip()}", flush=True)
    if r.returncode != 0:
        return 1

    from filip_engine.checkpoint import load_checkpoint
    from filip_engine.compare import compare_outputs
    from filip_engine.io_spec import Tolerance, tower_spec
    from filip_engine.runtime import OnnxRuntime, TensorRTRuntime, TorchRuntime
    from filip_export.to_onnx import example_inputs
    from filip_export.trt import engine_tolerance, plans_in
    from filip_export.triton_repo import TRT_MODELS

    model = load_checkpoint(ckpt).model
    cfg = model.config
    cuda_tol = Tolerance(max_abs=2e-3, min_cosine=0.9999)
    print("[3/4] in-process parity vs fp32 CPU PyTorch, and latency (median / p90 ms):", flush=True)
    for tower in ("image", "text"):
        spec = tower_spec(cfg, tower, 32)
        candidates = []
        try:
            candidates.append(("torch-cuda", TorchRuntime(load_checkpoint(ckpt).model, spec, device="cuda"), cuda_tol))
            candidates.append(("onnxruntime", OnnxRuntime(repo / f"filip_{tower}" / "1" / f"{tower}.onnx", spec), cuda_tol))
            plans = plans_in(repo / TRT_MODELS[tower] / "1") if (repo / TRT_MODELS[tower]).is_dir() else {}
            cc = "{}.{}".format(*torch.cuda.get_device_capability(0))
            if cc in plans:
                candidates.append((f"tensorrt-{args.precision}", TensorRTRuntime(repo / TRT_MODELS[tower] / "1" / plans[cc], spec),
                                   engine_tolerance(args.precision)))
            else:
                print(f"      {tower}: TensorRT skipped (no plan for sm{cc.replace('.', '')}: TensorRT not installed?)")
        except Exception as e:   # noqa: BLE001 - report and go on
            failed.append(f"{tower} runtime: {type(e).__name__}: {e}")
            print(f"      {tower}: {failed[-1]}")
        with TorchRuntime(model, spec) as ref:
            for batch in (1, 16):
                feeds = example_inputs(cfg, spec, batch, min(16, cfg.text.context_length), seed=batch)
                want = ref.infer(feeds)
                for name, rt, tol in candidates:
                    res = compare_outputs(want, rt.infer(feeds), tol, f"{tower} {name} batch={batch}")
                    med, p90 = _ms(lambda: rt.infer(feeds))
                    worst = min(o.min_cosine for o in res.outputs)
                    print(f"      {'ok  ' if res.passed else 'FAIL'} {tower:<5} {rt.name:<22} batch {batch:>2}: "
                          f"{med:7.2f} / {p90:7.2f} ms, min cos {worst:.6f}", flush=True)
                    if not res.passed:
                        failed.append(res.summary())
        for _, rt, _ in candidates:
            rt.close()

    if args.no_serve or time.perf_counter() - t_start > BUDGET_S - 60:
        print("[4/4] Triton: skipped (" + ("--no-serve" if args.no_serve else "time budget") + ")")
    else:
        import numpy as np
        from filip_client import FilipClient
        from filip_export.launch import TritonServer
        t = time.perf_counter()
        try:
            with TritonServer(repo, ready_timeout=150) as server, FilipClient(server.url) as client:
                print(f"[4/4] Triton ready in {server.startup_s:.1f} s; end-to-end latency (median / p90 ms):", flush=True)
                rng = np.random.default_rng(0)
                images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(16)]
                texts = [f"a photo of a dog number {i}" for i in range(32)]
                for label, fn in (("embed_texts x1", lambda: client.embed_texts(texts[:1])),
                                  ("embed_texts x32", lambda: client.embed_texts(texts)),
                                  ("embed_images x1", lambda: client.embed_images(images[:1])),
                                  ("embed_images x16", lambda: client.embed_images(images))):
                    med, p90 = _ms(fn, repeat=10, warmup=2)
                    print(f"      {label:<17} {med:7.2f} / {p90:7.2f} ms", flush=True)
                served = client.embed_texts(texts[:2])
                print(f"      served text tokens {served.tokens.shape}, pooled {served.pooled.shape}")
        except Exception as e:   # noqa: BLE001
            failed.append(f"Triton: {type(e).__name__}: {e}")
            print(f"      {failed[-1][:2000]}")
        print(f"      (Triton stage {time.perf_counter() - t:.1f} s)")
    print(f"gpu_check: {'FAILED' if failed else 'passed'} in {time.perf_counter() - t_start:.0f} s")
    for f in failed:
        print("  " + f.replace("\n", "\n  "))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
