"""GPU check, in two parts.

``python tools/gpu_check.py`` (default ``--stage bare``) needs only torch with CUDA, numpy and
this project (engine/, export/, client/ installed with ``--no-deps`` or on ``PYTHONPATH``: a
few MB).  No TensorRT, no tritonserver, no ftfy, no merges file, no ONNX Runtime: it never
tokenises (random token ids) and its references are NumPy.  Stages, each under its own time
bound, each reported as one line (``ok``, ``FAIL`` with the reason, or ``skip``; never a
traceback):

1. ``env``: GPU (NVML / nvidia-smi and torch), driver, torch and CUDA versions;
2. ``towers``: a random ViT-B-32 model, both towers on CUDA (fp32, TF32 off) vs the CPU
   fp32 reference (per-token and pooled cosine >= 0.9999), latency at batch 1 and 16;
3. ``fp16``: both towers under CUDA autocast fp16 (LayerNorm / softmax stay fp32, as in the
   TensorRT fp16 build) vs the CPU reference, against the TensorRT fp16 gate: min cosine
   >= 0.999 and s_T top-10 agreement >= 0.9 (64 images x 16 queries), with the margin;
4. ``scorer``: ``filip_score``'s token scoring on CUDA (``filip_engine.serving.score_request``,
   or its late-interaction kernel when the serving module cannot import here) vs a NumPy
   reference of s_I / s_T, with latency;
5. ``search``: exact s_T of 16 queries over a 2,048-item gallery on CUDA vs NumPy: top-10
   ranking agreement and score error, with latency.

``python tools/gpu_check.py --stage image`` runs inside the production image (TensorRT,
tritonserver): builds fp32 and fp16 plans with ``export/to_trt.py --runtime tensorrt`` (the
numerics gates included), tries an fp16 build with OBEY_PRECISION_CONSTRAINTS (D7: whether
"obey" would fail where the default "prefer" builds), and serves the TensorRT repository with
tritonserver: every model ready (D1: no warm-up BLS call during load), text / image / score
requests answered (D2: ``lengths`` sent as the config declares it), deep health ok.

``--device cpu`` runs the bare stages on the CPU with the tiny preset (a smoke test for
machines without a GPU; the tests use it).  Without CUDA and without ``--device cpu`` it
prints one line saying why it skipped and exits 0.  Exit 1 when a stage fails.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _use_checkout() -> None:
    """Run from a plain checkout (nothing installed but torch and numpy): the folders engine/
    and export/ under their installed names, client/ for filip_contract / filip_client."""
    import importlib.util
    for name, folder in (("filip_engine", "engine"), ("filip_export", "export")):
        try:
            importlib.import_module(name)
            continue
        except ImportError:
            pass
        spec = importlib.util.spec_from_file_location(name, ROOT / folder / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / folder)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    try:
        import filip_contract  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "client"))


import importlib  # noqa: E402

# the TensorRT gates (export/trt.py), restated so this file needs nothing from the exporter
FP32_MIN_COSINE = 0.9999
FP16_MIN_COSINE = 0.999
TOPK, MIN_TOPK_AGREEMENT = 10, 0.9


class StageTimeout(Exception):
    pass


@contextlib.contextmanager
def time_bound(seconds: float):
    """Raise StageTimeout in the main thread after ``seconds`` (checked when Python code runs)."""
    def on_alarm(signum, frame):
        raise StageTimeout(f"exceeded its {seconds:.0f} s bound")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Report:
    def __init__(self):
        self.failed: list[str] = []

    def run(self, name: str, bound: float, fn, *args) -> object:
        t0 = time.perf_counter()
        try:
            with time_bound(bound):
                result = fn(*args)
        except Exception as e:   # noqa: BLE001 - every failure is one line
            msg = " ".join(str(e).split())[:400]
            line = f"FAIL {name}: {type(e).__name__}: {msg} ({time.perf_counter() - t0:.1f} s)"
            self.failed.append(line)
            print(line, flush=True)
            return None
        if isinstance(result, Skip):
            print(f"skip {name}: {result.why}", flush=True)
            return None
        for ln in (result.lines if isinstance(result, Result) else []):
            print(f"      {ln}", flush=True)
        bad = result.failures if isinstance(result, Result) else []
        for b in bad:
            self.failed.append(f"FAIL {name}: {b}")
            print(f"FAIL {name}: {b}", flush=True)
        if not bad:
            print(f"ok   {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
        return result


class Skip:
    def __init__(self, why: str):
        self.why = why


class Result:
    def __init__(self):
        self.lines: list[str] = []
        self.failures: list[str] = []
        self.data: dict = {}


def _ms(fn, sync, repeat: int = 10, warmup: int = 2) -> tuple[float, float]:
    """(median, p90) wall milliseconds of ``fn()``, synchronised with ``sync()``."""
    for _ in range(warmup):
        fn()
    sync()
    t = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        t.append((time.perf_counter() - t0) * 1e3)
    t.sort()
    return statistics.median(t), t[int(0.9 * (len(t) - 1))]


def _cosines(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64).reshape(-1, a.shape[-1]), np.asarray(b, np.float64).reshape(-1, b.shape[-1])
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    ok = den > 0
    return (np.sum(a * b, axis=1)[ok] / den[ok]) if ok.any() else np.ones(1)


def _inputs(cfg, tower: str, batch: int, seq: int, seed: int) -> dict:
    """Random tower inputs (as export/to_onnx.example_inputs: SOT ... EOT rows, random lengths)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    if tower == "image":
        s = cfg.vision.image_size
        return {"pixel_values": rng.standard_normal((batch, 3, s, s)).astype(np.float32)}
    vocab = cfg.text.vocab_size
    lengths = rng.integers(2, seq + 1, size=batch)
    lengths[0] = seq
    ids = np.zeros((batch, seq), np.int64)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = vocab - 2, vocab - 1
        ids[i, 1:n - 1] = rng.integers(0, vocab - 2, size=n - 2)
    return {"input_ids": ids, "lengths": lengths.astype(np.int64)}


def s_scores_ref(img, il, txt, tl):
    """NumPy s_I, s_T [n_img, n_txt] (fp64) over each item's real tokens."""
    import numpy as np
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    sims = np.einsum("ipd,jtd->ijpt", img, txt)
    pm = np.arange(img.shape[1])[None, :] < np.asarray(il).reshape(-1, 1)      # [i, p]
    tm = np.arange(txt.shape[1])[None, :] < np.asarray(tl).reshape(-1, 1)      # [j, t]
    best_t = np.where(tm[None, :, None, :], sims, -np.inf).max(axis=3)          # [i, j, p]
    best_p = np.where(pm[:, None, :, None], sims, -np.inf).max(axis=2)          # [i, j, t]
    s_i = np.where(pm[:, None, :], best_t, 0).sum(2) / np.asarray(il).reshape(-1, 1)
    s_t = np.where(tm[None, :, :], best_p, 0).sum(2) / np.asarray(tl).reshape(1, -1)
    return s_i, s_t


def topk_agreement(ref, cand, k: int = TOPK) -> float:
    import numpy as np
    k = min(k, ref.shape[1])
    a = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    b = np.argsort(-cand, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


# --- bare stages -------------------------------------------------------------------------------
def stage_env(device: str):
    import torch
    r = Result()
    try:
        from filip_engine.gpu import list_gpus
        gpus = list_gpus()
        r.lines.append("NVML / nvidia-smi: " + (", ".join(f"{g.index}: {g.name} ({g.sm})" for g in gpus) or "no GPU"))
    except Exception as e:   # noqa: BLE001
        r.lines.append(f"NVML: unavailable ({type(e).__name__}: {e})")
    r.lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
    if device == "cuda":
        r.lines.append(f"torch device 0: {torch.cuda.get_device_name(0)} "
                       f"(sm{''.join(map(str, torch.cuda.get_device_capability(0)))})")
    return r


def _model(preset: str):
    from filip_engine.checkpoint import random_model
    return random_model(preset, seed=0)


def stage_towers(ctx):
    import torch
    from filip_engine.io_spec import tower_spec
    from filip_engine.runtime import TorchRuntime
    r = Result()
    cfg = ctx["cfg"]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sync = (lambda: torch.cuda.synchronize()) if ctx["device"] == "cuda" else (lambda: None)
    for tower in ("image", "text"):
        spec = tower_spec(cfg, tower, 64)
        ref = TorchRuntime(_model(ctx["preset"]), spec, device="cpu")
        cand = TorchRuntime(_model(ctx["preset"]), spec, device=ctx["device"])
        for batch in (1, 16):
            feeds = _inputs(cfg, tower, batch, min(16, cfg.text.context_length), seed=batch)
            want, got = ref.infer(feeds), cand.infer(feeds)
            worst = min(float(_cosines(want[k], got[k]).min()) for k in want)
            med, p90 = _ms(lambda: cand.infer(feeds), sync)
            r.lines.append(f"{tower:<5} {cand.name} fp32 batch {batch:>2}: {med:7.2f} / {p90:7.2f} ms (median / p90), "
                           f"min cosine vs CPU {worst:.6f}")
            if worst < FP32_MIN_COSINE:
                r.failures.append(f"{tower} fp32 batch {batch}: min cosine {worst:.6f} < {FP32_MIN_COSINE}")
        cand.close()
    return r


def stage_fp16(ctx):
    import numpy as np
    import torch
    r = Result()
    cfg, device = ctx["cfg"], ctx["device"]
    ref_model, model = _model(ctx["preset"]), _model(ctx["preset"]).to(device)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16     # CPU autocast knows bf16 only: smoke mode

    def run(m, tower, feeds, dev, autocast):
        args = [torch.from_numpy(feeds[k]).to(dev) for k in (("pixel_values",) if tower == "image" else ("input_ids", "lengths"))]
        fn = m.encode_image if tower == "image" else m.encode_text
        with torch.inference_mode(), torch.autocast(device_type=dev, dtype=dtype, enabled=autocast):
            tokens, pooled = fn(*args)
        return tokens.float().cpu().numpy(), pooled.float().cpu().numpy()

    img = _inputs(cfg, "image", ctx["n_images"], 0, 7)
    txt = _inputs(cfg, "text", 16, min(16, cfg.text.context_length), 8)
    outs = {}
    for tower, feeds in (("image", img), ("text", txt)):
        outs[tower] = []
        for i in range(0, len(next(iter(feeds.values()))), 16):
            part = {k: v[i:i + 16] for k, v in feeds.items()}
            outs[tower].append((run(ref_model, tower, part, "cpu", False), run(model, tower, part, device, True)))
        cos = min(float(_cosines(a[j], b[j]).min()) for a, b in outs[tower] for j in range(2))
        r.lines.append(f"{tower:<5} autocast {str(dtype).split('.')[-1]} vs CPU fp32: min cosine {cos:.6f} "
                       f"(TensorRT fp16 gate {FP16_MIN_COSINE}, margin {cos - FP16_MIN_COSINE:+.6f})")
        if device == "cuda" and cos < FP16_MIN_COSINE:
            r.failures.append(f"{tower} fp16 min cosine {cos:.6f} < {FP16_MIN_COSINE}")
    it_ref = np.concatenate([a[0] for a, _ in outs["image"]])
    it_16 = np.concatenate([b[0] for _, b in outs["image"]])
    tt_ref = np.concatenate([a[0] for a, _ in outs["text"]])
    tt_16 = np.concatenate([b[0] for _, b in outs["text"]])
    il = np.full(len(it_ref), it_ref.shape[1])
    _, s_ref = s_scores_ref(it_ref, il, tt_ref, txt["lengths"])
    _, s_16 = s_scores_ref(it_16, il, tt_16, txt["lengths"])
    agree = topk_agreement(s_ref.T, s_16.T)
    r.lines.append(f"s_T top-{TOPK} agreement over 16 queries x {len(il)} images: {agree:.3f} "
                   f"(gate {MIN_TOPK_AGREEMENT}, margin {agree - MIN_TOPK_AGREEMENT:+.3f})")
    if device == "cuda" and agree < MIN_TOPK_AGREEMENT:
        r.failures.append(f"s_T top-{TOPK} agreement {agree:.3f} < {MIN_TOPK_AGREEMENT}")
    return r


def _unit(rng, shape):
    import numpy as np
    a = rng.standard_normal(shape).astype(np.float32)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def stage_scorer(ctx):
    import numpy as np
    import torch
    r = Result()
    device = ctx["device"]
    rng = np.random.default_rng(3)
    it, tt = _unit(rng, (12, 50, 64)), _unit(rng, (9, 20, 64))
    il = np.full((12, 1), 50, np.int32)
    il[3] = 17
    tl = rng.integers(2, 21, (9, 1)).astype(np.int32)
    try:
        from filip_engine.serving import score_request
        how = "filip_engine.serving.score_request"

        def score():
            out = score_request({"IMAGE_TOKENS": it, "IMAGE_LENGTHS": il, "TEXT_TOKENS": tt, "TEXT_LENGTHS": tl},
                                wanted=("S_I", "S_T"), device=device)
            if isinstance(out, Exception):
                raise out
            return np.asarray(out["S_I"]), np.asarray(out["S_T"])
    except ImportError as e:
        from filip_engine.interaction import late_interaction
        how = f"filip_engine.interaction.late_interaction (serving does not import here: {e})"

        def score():
            s = late_interaction(torch.from_numpy(it).to(device), il.reshape(-1), torch.from_numpy(tt).to(device), tl.reshape(-1))
            return np.asarray(s.s_i), np.asarray(s.s_t)
    s_i, s_t = score()
    ref_i, ref_t = s_scores_ref(it, il.reshape(-1), tt, tl.reshape(-1))
    err = max(float(np.abs(s_i - ref_i).max()), float(np.abs(s_t - ref_t).max()))
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    med, p90 = _ms(score, sync)
    r.lines.append(f"token scoring on {device} via {how}: 12 x 9 pairs, max |error| vs NumPy {err:.2e}, "
                   f"{med:.2f} / {p90:.2f} ms")
    if err > 1e-4:
        r.failures.append(f"scorer on {device}: max |error| {err:.2e} > 1e-4 vs NumPy")
    return r


def stage_search(ctx):
    import numpy as np
    import torch
    from filip_engine.interaction import late_interaction
    r = Result()
    device = ctx["device"]
    rng = np.random.default_rng(4)
    n = ctx["gallery"]
    gallery = _unit(rng, (n, 50, 64)).astype(np.float16)       # stored as the gallery stores it
    q, ql = _unit(rng, (16, 20, 64)), rng.integers(2, 21, 16)
    il = np.full(n, 50)
    g = torch.from_numpy(gallery).to(device)

    def search():
        s = late_interaction(g.float(), il, torch.from_numpy(q).to(device), ql)
        return np.asarray(s.s_t).T                                # [queries, items]
    got = search()
    want = np.concatenate([s_scores_ref(gallery[a:a + 256], il[a:a + 256], q, ql)[1] for a in range(0, n, 256)]).T
    agree, err = topk_agreement(want, got), float(np.abs(got - want).max())
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    med, p90 = _ms(search, sync, repeat=5, warmup=1)
    r.lines.append(f"exact s_T, 16 queries x {n} items on {device}: top-{TOPK} agreement {agree:.3f}, "
                   f"max |error| {err:.2e}, {med:.1f} / {p90:.1f} ms")
    if agree < 1.0 - 1e-9 and err > 1e-4:
        r.failures.append(f"search on {device}: top-{TOPK} agreement {agree:.3f}, max |error| {err:.2e}")
    return r


# --- inside the image --------------------------------------------------------------------------
def _run(cmd, timeout, cwd=ROOT):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout, r.stderr.strip()


def stage_build(ctx, precision: str):
    r = Result()
    repo = ctx["work"] / f"repo_{precision}"
    code, out, err = _run([sys.executable, "export/to_trt.py", str(ctx["ckpt"]), "--out", str(repo), "--runtime",
                           "tensorrt", "--precision", precision, "--max-batch", "16"], ctx["bound"] - 5)
    r.lines += [ln.strip() for ln in out.splitlines() if "TensorRT" in ln or "gate" in ln][-8:]
    if code != 0:
        r.failures.append(f"export/to_trt.py --precision {precision} exit {code}: {err.splitlines()[-1] if err else ''}")
    ctx[f"repo_{precision}"] = repo if code == 0 else None
    return r


def stage_obey(ctx):
    """D7: does an fp16 build with OBEY_PRECISION_CONSTRAINTS and the fp32 pins succeed here?"""
    r = Result()
    from filip_engine.checkpoint import load_checkpoint
    from filip_engine.io_spec import tower_spec
    from filip_export.to_onnx import export_tower
    from filip_export.trt import build_engine
    model = load_checkpoint(ctx["ckpt"]).model
    for tower in ("image", "text"):
        onnx = export_tower(model, tower, ctx["work"] / "obey" / f"{tower}.onnx", max_batch=16)
        for constraints in ("obey", "prefer"):
            try:
                build_engine(onnx, ctx["work"] / "obey" / f"{tower}.{constraints}.plan", tower_spec(model.config, tower, 16),
                             precision="fp16", max_batch=16, timing_cache=None, constraints=constraints, log=lambda *_: None)
                r.lines.append(f"D7 {tower}: fp16 with {constraints.upper()}_PRECISION_CONSTRAINTS builds")
            except Exception as e:   # noqa: BLE001
                line = f"D7 {tower}: fp16 with {constraints.upper()}_PRECISION_CONSTRAINTS fails: {' '.join(str(e).split())[:200]}"
                r.lines.append(line)
                if constraints == "prefer":      # the default must build; obey failing is the finding D7 names
                    r.failures.append(line)
    return r


def stage_serve(ctx, precision: str):
    import numpy as np
    r = Result()
    repo = ctx.get(f"repo_{precision}")
    if repo is None:
        return Skip(f"no {precision} repository (its build failed)")
    from filip_client import FilipClient
    from filip_export.launch import TritonServer
    with TritonServer(repo, ready_timeout=ctx["bound"] - 30) as server, FilipClient(server.url, timeout=30) as c:
        r.lines.append(f"D1 decided: tritonserver started with every model ready in {server.startup_s:.1f} s "
                       "(no warm-up BLS call during load)")
        txt = c.embed_texts(["a photo of a cat", "two dogs in the snow"])
        r.lines.append(f"D2 decided: filip_text through filip_text_trt answered tokens {txt.tokens.shape}, "
                       f"lengths {txt.lengths.tolist()}")
        rng = np.random.default_rng(0)
        img = c.embed_images([rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)])
        s = c.score(img, txt)
        r.lines.append(f"filip_image tokens {img.tokens.shape}, filip_score {np.asarray(s).shape}")
        h = c.health(deep=True)
        if not h.ok:
            r.failures.append(f"deep health: {h.canaries}")
        for label, fn in (("embed_texts x32", lambda: c.embed_texts([f"a photo number {i}" for i in range(32)])),
                          ("embed_images x16", lambda: c.embed_images([rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
                                                                      for _ in range(16)]))):
            med, p90 = _ms(fn, lambda: None, repeat=5, warmup=1)
            r.lines.append(f"{precision} served {label}: {med:.1f} / {p90:.1f} ms")
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["bare", "image", "all"], default="bare")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: CUDA, else skip; cpu: smoke mode with the tiny preset")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--stage-timeout", type=float, default=240.0, help="time bound of each stage, seconds")
    args = p.parse_args(argv)
    try:
        import numpy  # noqa: F401
        import torch
    except ImportError as e:
        print(f"gpu_check: skipped: {e}")
        return 0
    _use_checkout()
    device = args.device
    if device == "auto":
        if not torch.cuda.is_available():
            print(f"gpu_check: skipped: no CUDA device is visible to torch {torch.__version__} "
                  f"(torch.cuda.is_available() is False; --device cpu runs the smoke mode)")
            return 0
        device = "cuda"
    from filip_engine.config import preset
    name = "ViT-B-32" if device == "cuda" else "tiny"
    ctx = {"device": device, "preset": name, "cfg": preset(name), "n_images": 64 if device == "cuda" else 32,
           "gallery": 2048 if device == "cuda" else 256, "bound": args.stage_timeout}
    t0 = time.perf_counter()
    rep = Report()
    print(f"gpu_check: device {device}, model {name} (random weights), stages {args.stage}", flush=True)
    if args.stage in ("bare", "all"):
        rep.run("env", 60, stage_env, device)
        rep.run("towers (fp32 on device vs CPU)", args.stage_timeout, stage_towers, ctx)
        rep.run("fp16 numerics margin", args.stage_timeout, stage_fp16, ctx)
        rep.run("scorer on device vs NumPy", args.stage_timeout, stage_scorer, ctx)
        rep.run("search on device vs NumPy", args.stage_timeout, stage_search, ctx)
    if args.stage in ("image", "all"):
        work = args.workdir or Path(tempfile.mkdtemp(prefix="filip-gpu-check-"))
        work.mkdir(parents=True, exist_ok=True)
        ctx["work"] = work

        def make_ckpt():
            from filip_engine.checkpoint import save_checkpoint
            from filip_engine.tokenizer import ClipTokenizer, find_clip_merges_file
            ctx["ckpt"] = work / "random.pt"
            save_checkpoint(ctx["ckpt"], _model(name), vocab_text=ClipTokenizer.from_file(find_clip_merges_file()).merges_text)
            return Result()
        rep.run("image: checkpoint", 120, make_ckpt)
        if "ckpt" in ctx:
            for precision in ("fp32", "fp16"):
                rep.run(f"image: build {precision} plans + gates", args.stage_timeout, stage_build, ctx, precision)
            rep.run("image: D7 obey vs prefer precision constraints", args.stage_timeout, stage_obey, ctx)
            for precision in ("fp32", "fp16"):
                rep.run(f"image: serve the {precision} TensorRT repository (D1, D2)", args.stage_timeout, stage_serve, ctx,
                        precision)
    print(f"gpu_check: {'FAILED' if rep.failed else 'passed'} in {time.perf_counter() - t0:.0f} s")
    for f in rep.failed:
        print("  " + f)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
