"""python export/to_trt.py CKPT [--out DIR] [--vocab FILE] [--precision fp32|fp16|bf16|int8]
                          [--max-batch N] [--runtime auto|tensorrt|onnxruntime] [--activation ...]

Checkpoint -> ONNX (both towers) -> validated against PyTorch on ONNX Runtime, figures
printed -> TensorRT plans when TensorRT and an NVIDIA GPU are present (validated against
PyTorch too; export/trt.py), or with --precision bf16 / int8 the CPU's reduced-precision
engines (OpenVINO bf16, int8 by ONNX Runtime or NNCF + OpenVINO; gated against PyTorch on
held-out inputs, export/cpu_precision.py) -> a complete Triton model repository in --out.
Anything wrong ends with one sentence on stderr and a non-zero exit: 2 for bad input
(checkpoint, vocabulary, flags, no TensorRT/GPU for --runtime tensorrt, a CPU without bf16
instructions), 1 for a failed numerics gate.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from filip_contract.limits import ServingLimits
from filip_engine.artifacts import update_manifest, write_manifest
from filip_engine.checkpoint import load_checkpoint
from filip_engine.errors import FilipError, ValidationError
from filip_engine.pipeline import checkpoint_transform, load_tokenizer
from filip_export.to_onnx import DEFAULT_OPSET, MIN_OPSET, export_tower, validate_tower
from filip_export.staging import StagedRepository
from filip_export.triton_repo import MODELS, TRT_MODELS, RepoSettings, TensorRTPlans, version_dir, write_repository


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python export/to_trt.py", description=__doc__.split("\n\n")[1])
    p.add_argument("checkpoint", type=Path, help="native, OpenCLIP/OpenAI CLIP or DeCLIP FILIP checkpoint file, "
                        "or a Hugging Face CLIPModel directory (config.json + weights + tokenizer files)")
    p.add_argument("--out", type=Path, default=Path("triton_models"), help="output directory (default: triton_models)")
    p.add_argument("--vocab", type=Path, default=None,
                   help="CLIP BPE merges file (bpe_simple_vocab_16e6.txt[.gz]) or a Hugging Face tokenizer.json; "
                        "default: the checkpoint's own, else the one shipped in installed packages")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], default="fp32",
                   help="fp32 (exact) or fp16: TensorRT engine precision; bf16 or int8: CPU engines (OpenVINO bf16 "
                        "on CPUs with bf16 instructions; int8 by ONNX Runtime or NNCF + OpenVINO), gated against "
                        "PyTorch (ONNX artifacts are always written in fp32 too)")
    p.add_argument("--int8-engine", choices=["auto", "onnxruntime", "openvino"], default="auto",
                   help="--precision int8: auto (default) builds both and serves the faster that passes its gate")
    p.add_argument("--calibration-images", type=Path, default=None, metavar="DIR",
                   help="--precision bf16/int8: your own images (at least 40) to calibrate, tune and gate on; "
                        "default: drawn pictures through the checkpoint's preprocessing")
    p.add_argument("--calibration-texts", type=Path, default=None, metavar="FILE",
                   help="--precision bf16/int8: your own captions, one per line (at least 40); default: drawn captions")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch the engines accept (default 64)")
    p.add_argument("--runtime", choices=["auto", "tensorrt", "onnxruntime"], default="auto",
                   help="auto: TensorRT when TensorRT and an NVIDIA GPU are present, else ONNX Runtime")
    p.add_argument("--activation", choices=["quick_gelu", "gelu"], default=None,
                   help="MLP activation of a foreign (OpenCLIP/DeCLIP) state dict: quick_gelu (OpenAI CLIP, DeCLIP; "
                        "the default) or gelu (OpenCLIP's LAION models); native checkpoints carry their own")
    p.add_argument("--instances", type=int, default=1,
                   help="Triton instances per encoder model (each a process with its own ONNX Runtime session; default 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="encoder threads per instance (ONNX Runtime intra-op / OpenVINO inference threads); 0 (default): "
                        "ONNX Runtime: the usable cores divided among the instances; OpenVINO: every usable core")
    p.add_argument("--queue-delay-us", type=int, default=500,
                   help="dynamic batching: how long Triton waits to fill a batch, in microseconds (default 500)")
    p.add_argument("--max-queue-size", type=int, default=0,
                   help="requests queued per encoder model before new ones are refused as UNAVAILABLE; 0 (default): "
                        "no queue policy, callers' deadlines bound the work (a policy costs up to 500 ms stalls "
                        "in Triton 2.51's batcher)")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="a per-request limit the server enforces and clients echo (repeatable): " + ", ".join(
                       f"{k} ({v:,})" for k, v in dataclasses.asdict(ServingLimits()).items()))
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= {MIN_OPSET}, default {DEFAULT_OPSET})")
    return p


def tensorrt_available() -> tuple[bool, str]:
    """Whether a TensorRT build can run here, and if not, why."""
    from filip_engine.gpu import import_tensorrt
    try:
        import_tensorrt()
    except ImportError:
        return False, "the tensorrt Python package is not installed"
    from filip_engine.gpu import cuda_visible
    if not cuda_visible():       # the driver's NVML, not torch (the image's torch is a CPU build)
        return False, "no NVIDIA GPU is visible"
    return True, ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except FilipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:     # the filesystem: unwritable, missing, full
        where = e.filename or args.out
        print(f"error: cannot write the model repository {args.out}: {e.strerror or e} ({where}); "
              "the previous repository is unchanged", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.max_batch < 1:
        raise FilipError(f"--max-batch must be at least 1, got {args.max_batch}")
    known = {f.name for f in dataclasses.fields(ServingLimits)}
    overrides = {}
    for item in args.limit:
        name, _, value = item.partition("=")
        if name not in known or not value.isdigit() or int(value) < 1:
            raise FilipError(f"--limit {item!r}: expected NAME=POSITIVE_INT with NAME one of {sorted(known)}")
        overrides[name] = int(value)
    limits = ServingLimits(**overrides)
    if args.max_queue_size < 0:
        raise FilipError(f"--max-queue-size must be 0 (no queue policy) or positive, got {args.max_queue_size}")
    if args.instances < 1 or args.queue_delay_us < 0 or args.threads < 0:
        raise FilipError(f"--instances must be >= 1, --queue-delay-us and --threads >= 0, got {args.instances}, "
                         f"{args.queue_delay_us} and {args.threads}")
    cpu_precision = args.precision in ("bf16", "int8")
    if not cpu_precision and (args.calibration_images or args.calibration_texts):
        raise FilipError("--calibration-images / --calibration-texts apply to --precision bf16 or int8 only")
    if cpu_precision:
        if args.runtime == "tensorrt":
            raise FilipError(f"--precision {args.precision} builds CPU engines; TensorRT builds fp32 or fp16 "
                             "(--precision fp16 --runtime tensorrt)")
        from filip_engine.precision import check_cpu_supports
        if args.precision == "bf16" or args.int8_engine == "openvino":
            check_cpu_supports(args.precision)       # before the slow steps
        trt_ok, trt_why = False, f"--precision {args.precision} builds CPU engines"
    else:
        trt_ok, trt_why = tensorrt_available()
    if args.runtime == "tensorrt":
        if not trt_ok:
            raise FilipError(f"--runtime tensorrt was requested but {trt_why}; use --runtime onnxruntime or auto")
    use_trt = trt_ok and args.runtime != "onnxruntime"
    if args.precision == "fp16" and not use_trt:
        why = trt_why or "--runtime onnxruntime"
        raise FilipError(f"--precision fp16 is a TensorRT precision and TensorRT will not build here ({why}); "
                         "on a CPU use --precision bf16 or int8")
    if use_trt:
        from filip_export.trt import build_flags, import_tensorrt
        try:   # fail before the slow steps when this TensorRT cannot build this precision
            build_flags(args.precision, import_tensorrt().__version__)
        except FilipError as e:
            if args.runtime == "tensorrt":
                raise
            use_trt, trt_why = False, str(e).rstrip(".")

    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.checkpoint, activation=args.activation)
    cfg = ckpt.config
    print(f"[1/5] loaded {ckpt.path} ({ckpt.layout} layout): image {cfg.vision.image_size}px/{cfg.vision.patch_size} "
          f"w{cfg.vision.width}x{cfg.vision.layers}, text ctx {cfg.text.context_length} w{cfg.text.width}x{cfg.text.layers}, "
          f"tokens D={cfg.token_dim} ({cfg.token_head} head), pooled D={cfg.embed_dim}, {cfg.activation}")

    tok, source = load_tokenizer(cfg, vocab=args.vocab, embedded=ckpt.vocab_text, bundled=ckpt.tokenizer_file)
    out = args.out
    # Everything is written into a staging folder beside --out and swapped in after the last
    # gate: a failed or killed export leaves the previous repository as it was.
    with StagedRepository(out, set(MODELS) | set(TRT_MODELS.values())) as staged:
        models, settings = _write(args, ckpt, tok, source, limits, use_trt, trt_why, staged)
        staged.commit()
    print(f"[5/5] Triton model repository {out}: {', '.join(m.name for m in models)} "
          f"(max batch {settings.max_batch}, queue delay {settings.queue_delay_us} us); "
          f"serve it with: tritonserver --model-repository {out}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _write(args, ckpt, tok, source, limits, use_trt, trt_why, staged: StagedRepository):
    """Steps 2-5 into the staging folder; raises on any failed gate."""
    cfg, work = ckpt.config, staged.work

    def shown(p: Path) -> Path:         # where a file will be once the repository is swapped in
        return args.out / Path(p).relative_to(work)

    text_dir, image_dir = version_dir(work, "filip_text"), version_dir(work, "filip_image")
    tok.save(text_dir / "tokenizer.json")
    transform = checkpoint_transform(ckpt)
    for d in (text_dir, image_dir, version_dir(work, "filip_score")):
        write_manifest(d, cfg, logit_scale=ckpt.model.similarity_scale(), layout=ckpt.layout, source=ckpt.path.name,
                       preprocess=transform.to_dict(), default_scoring=ckpt.default_scoring,
                       extra={"opset": args.opset, "max_batch": args.max_batch})
    print(f"[2/5] tokenizer from {source}: {tok.vocab_size} entries, SOT={tok.sot_token_id} EOT={tok.eot_token_id} "
          f"-> {shown(text_dir / 'tokenizer.json')}")

    paths = {}
    for tower, d in (("image", image_dir), ("text", text_dir)):
        t = time.perf_counter()
        paths[tower] = export_tower(ckpt.model, tower, d / f"{tower}.onnx", opset=args.opset, max_batch=args.max_batch)
        print(f"[3/5] exported {tower} tower -> {shown(paths[tower])} (opset {args.opset}, {time.perf_counter() - t:.1f} s)")

    print("[4/5] ONNX Runtime (CPU) vs PyTorch, fp32:")
    results = []
    for tower in ("image", "text"):
        for r in validate_tower(ckpt.model, paths[tower], tower):
            print("  " + r.summary().replace("\n", "\n  "))
            results.append(r)
    for r in results:
        r.raise_if_failed()
    print("      all numerics gates passed")

    tensorrt, engines = None, None
    if use_trt:
        tensorrt = _build_tensorrt(args, ckpt, paths, staged)
    elif args.precision in ("bf16", "int8"):
        engines = _build_cpu_engines(args, ckpt, tok, transform, paths)
        for tower, d in (("image", image_dir), ("text", text_dir)):
            update_manifest(d, engine=engines[tower].to_dict(tower))
        update_manifest(version_dir(work, "filip_score"), engines={t: e.to_dict(t) for t, e in engines.items()})
    else:
        print(f"      TensorRT engines: skipped ({trt_why or '--runtime onnxruntime'}); ONNX Runtime serves the encoders")
    settings = RepoSettings(max_batch=args.max_batch, queue_delay_us=args.queue_delay_us,
                            text_instances=args.instances, image_instances=args.instances, intra_op_threads=args.threads,
                            max_queue_size=args.max_queue_size, limits=limits)
    models = write_repository(work, cfg, logit_scale=ckpt.model.similarity_scale(), default_scoring=ckpt.default_scoring,
                              settings=settings, tensorrt=tensorrt, engines=engines)
    return models, settings


def _build_cpu_engines(args, ckpt, tok, transform, paths):
    """The bf16 / int8 CPU engines of both towers, gated on held-out inputs (ValidationError
    -> exit 1; the staged repository is then dropped)."""
    from filip_export.calibration import gate_inputs
    from filip_export.cpu_precision import GATE_TOLERANCE, build_cpu_engines
    t = time.perf_counter()
    data = gate_inputs(transform, tok, images=args.calibration_images, texts=args.calibration_texts)
    print(f"[4/5] {args.precision} CPU engines, gated vs PyTorch fp32 on held-out inputs (images: {data.source['images']}, "
          f"texts: {data.source['texts']}; gate: cos >= {GATE_TOLERANCE.min_cosine}, |d| <= {GATE_TOLERANCE.max_abs:g}, "
          f"top-10 agreement >= 0.9):")
    engines = build_cpu_engines(ckpt.model, args.precision, paths, data, int8_engine=args.int8_engine,
                                max_batch=args.max_batch)
    print(f"      all {args.precision} numerics gates passed in {time.perf_counter() - t:.1f} s; "
          + ", ".join(f"{tw}: {e.engine} ({e.file_for(tw)})" for tw, e in engines.items()) + " serve the encoders")
    return engines


def _build_tensorrt(args, ckpt, paths, staged: StagedRepository) -> TensorRTPlans:
    """Build both towers' plans into the tensorrt_plan models' version folders, validate them
    against PyTorch (ValidationError -> exit 1; the staged repository is then dropped, so no
    later start serves them) and return what the repository's configs need.  Plans the
    previous repository holds for other GPU architectures are carried over."""
    from filip_engine.io_spec import tower_spec
    from filip_export.trt import (DEFAULT_TIMING_CACHE, build_engine, checkpoint_fingerprint, detect_environment,
                            plan_filename, plans_in, raise_if_gates_failed, validate_engines)
    env = detect_environment()
    cc = env["compute_capability"]
    plans = {}
    for tower in ("image", "text"):
        t = time.perf_counter()
        folder = version_dir(staged.work, TRT_MODELS[tower])
        previous = staged.previous(f"{TRT_MODELS[tower]}/1")
        for old in sorted(previous.glob("model.sm*.plan*")) if previous else ():
            if not old.name.startswith(plan_filename(cc)):          # this GPU's plan is rebuilt
                shutil.copy2(old, folder / old.name)
        plan = folder / plan_filename(cc)
        build_engine(paths[tower], plan, tower_spec(ckpt.config, tower, args.max_batch), precision=args.precision,
                     max_batch=args.max_batch, timing_cache=DEFAULT_TIMING_CACHE,
                     checkpoint=checkpoint_fingerprint(ckpt.path), log=print)
        plans[tower] = plan
        print(f"[4/5] TensorRT {env['tensorrt_version']} {args.precision} engine, {tower} tower, {env['gpu_name']} "
              f"(sm{cc[0]}{cc[1]}) -> {plan} ({time.perf_counter() - t:.1f} s)")
    print(f"[4/5] TensorRT ({args.precision}) vs PyTorch:")
    results, ranking = validate_engines(ckpt.model, plans, precision=args.precision, max_batch=args.max_batch)
    for r in results:
        print("  " + r.summary().replace("\n", "\n  "))
    if ranking is not None:
        print("  " + ranking.line())
    raise_if_gates_failed(results, ranking)
    print("      all TensorRT numerics gates passed; the tensorrt_plan models serve the encoders")
    return TensorRTPlans(files={t: plans_in(p.parent) for t, p in plans.items()},
                         default={t: p.name for t, p in plans.items()})


if __name__ == "__main__":
    sys.exit(main())
