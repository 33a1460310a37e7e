"""The served contract is declared once and everything derives from it: generated configs
parse and match it, repositories are relocatable and name no path of the machine that wrote
them, the served ONNX Runtime stubs load no torch, and the client installs on its own."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from filip_contract import models as M
from filip_contract.limits import ServingLimits
from filip_engine.config import PRESETS
from filip_export.triton_repo import RepoSettings, adapter_source, config_text, model_configs, parse_config

ROOT = Path(__file__).resolve().parent.parent
CFG = PRESETS["ViT-B-32"]
SIZES = {"D": CFG.token_dim, "E": CFG.embed_dim, "S": CFG.vision.image_size, "P": CFG.vision.num_patches}
TRITON_TYPE = {"FP32": "TYPE_FP32", "INT32": "TYPE_INT32", "BYTES": "TYPE_STRING"}


def _python(code: str, python: str = sys.executable, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd or ROOT)


def test_generated_configs_are_the_contract():
    configs = model_configs(CFG, RepoSettings(), 100.0)
    assert list(configs) == list(M.MODELS)
    for name, model in M.MODELS.items():
        c = parse_config(config_text(configs[name]))
        assert c == configs[name], name                                   # the written text parses back whole
        assert c.backend == "python" and (c.max_batch_size > 0) == model.batched, name
        got_in = [(i.name, mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in c.input]
        want_in = [(t.name, TRITON_TYPE[t.datatype], list(t.resolve(SIZES)), t.optional) for t in model.inputs]
        assert got_in == want_in, name
        got_out = [(o.name, mc.DataType.Name(o.data_type), list(o.dims)) for o in c.output]
        want_out = [(t.name, TRITON_TYPE[t.datatype], list(t.resolve(SIZES))) for t in model.outputs]
        assert got_out == want_out, name
        published = {k: v.string_value for k, v in c.parameters.items() if k.startswith(ServingLimits.PARAM_PREFIX)}
        assert ServingLimits.from_params(published) == ServingLimits() and len(published) == len(ServingLimits().to_params())
    assert dict(configs["filip_text"].model_warmup[0].inputs)["TEXT"].input_data_file == "text"


def test_config_values_are_escaped_by_protobuf():
    odd = 'C:\\galleries\\"quoted" name\nnext line'
    c = model_configs(CFG, RepoSettings(gallery_root=odd, limits=ServingLimits(max_text_chars=77)), 100.0)["filip_search"]
    back = parse_config(config_text(c))
    assert back.parameters["gallery_root"].string_value == odd
    assert ServingLimits.from_params({k: v.string_value for k, v in back.parameters.items()}).max_text_chars == 77


def test_tracked_adapters_are_the_generated_ones():
    for name, model in M.MODELS.items():
        assert (ROOT / "triton_models" / name / "1" / "model.py").read_text() == adapter_source(model), name
    from filip_engine.adapters import ADAPTERS
    assert set(ADAPTERS) == set(M.MODELS) and all(hasattr(c, "initialize") and hasattr(c, "execute") for c in ADAPTERS.values())


def test_what_each_side_imports():
    """The contract needs numpy only; the client no engine, torch or ONNX Runtime; the served
    models' code no torch (a CPU server's stubs run ONNX Runtime)."""
    r = _python("import sys, filip_contract, filip_contract.models, filip_contract.limits, filip_contract.errors, "
                "filip_contract.gallery_reader, filip_contract.gallery_writer, filip_contract.prompts\n"
                "print(sorted(m for m in ('tritonclient', 'PIL', 'grpc', 'torch', 'filip_engine', 'filip_client') if m in sys.modules))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    r = _python("import sys, filip_client\n"
                "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'faiss', 'filip_engine', 'filip_export') if m in sys.modules))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    r = _python("import sys, filip_engine.adapters, filip_engine.serving, filip_engine.search\n"
                "print(sorted(m for m in ('torch',) if m in sys.modules))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    r = _python("import importlib, pkgutil, sys, filip_engine\n"                    # data flows one way
                "for m in pkgutil.iter_modules(filip_engine.__path__): importlib.import_module('filip_engine.' + m.name)\n"
                "print(sorted({m.split('.')[0] for m in sys.modules} & {'filip_client', 'filip_export', 'tools'}))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_engine_wheel_has_no_generic_top_level_packages(tmp_path):
    src = tmp_path / "src"                       # a copy: building writes build/ and egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "engine", "export"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import zipfile
    (wheel,) = tmp_path.glob("filip_engine-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"filip_engine", "filip_export"}, tops


@pytest.mark.slow
def test_client_distribution_installs_alone(tmp_path):
    """``pip install ./client`` into a fresh venv: no torch, ONNX, ONNX Runtime, faiss or
    pytriton, no generic top-level package, and the client imports."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = str(env_dir / "bin" / "python")
    client = shutil.copytree(ROOT / "client", tmp_path / "client", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    r = subprocess.run([py, "-m", "pip", "install", "-q", str(client)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _python("import importlib.metadata as md\nprint('\\n'.join(sorted(d.metadata['Name'].lower() for d in md.distributions())))",
                python=py, cwd=tmp_path)
    names = set(r.stdout.split())
    print(f"pip install ./client: {len(names)} distributions: {sorted(names)}")
    assert "filip-client" in names
    assert not names & {"torch", "onnx", "onnxruntime", "faiss-cpu", "nvidia-pytriton", "filip-engine"}, names
    site = Path(_python("import sysconfig; print(sysconfig.get_paths()['purelib'])", python=py, cwd=tmp_path).stdout.strip())
    assert not {p.name for p in site.iterdir()} & {"client", "engine", "export", "triton_models", "tools"}
    r = _python("from filip_client import FilipClient, AsyncFilipClient, Embeddings\n"
                "from filip_contract.gallery_writer import GalleryWriter\nprint('ok')", python=py, cwd=tmp_path)
    assert r.stdout.strip() == "ok", r.stderr


def _stub_pids(server_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "triton_python_backend_stub"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if _parent_chain_has(int(p), server_pid)]


def _parent_chain_has(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


@pytest.mark.slow
def test_moved_repository_serves_and_names_no_build_path(tiny_checkpoint, tmp_path):
    """Export, move the repository to another folder, serve it from there; nothing written
    names the export folder or the source checkout, and no stub loads torch."""
    from filip_client import FilipClient
    from filip_export.launch import TritonServer
    from filip_export.to_trt import main as export_main

    first = tmp_path / "build-here" / "triton_models"
    assert export_main([str(tiny_checkpoint), "--out", str(first), "--max-batch", "8"]) == 0
    moved = tmp_path / "elsewhere" / "repo"
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    shutil.rmtree(tmp_path / "build-here")
    for f in moved.rglob("*"):
        if f.is_file() and f.suffix not in (".onnx", ".data"):
            text = f.read_bytes().decode("utf-8", errors="replace")
            for path in (str(ROOT), str(tmp_path), str(tiny_checkpoint.parent)):
                assert path not in text, f"{f.relative_to(moved)} names {path}"
    with TritonServer(moved) as server, FilipClient(server.url, timeout=60) as client:
        txt = client.embed_texts(["a photo of a cat"])
        assert txt.tokens.shape[0] == 1 and np.isfinite(txt.pooled).all()
        assert client.health(deep=True).ok
        stubs = _stub_pids(server.proc.pid)
        assert len(stubs) == len(M.MODELS), stubs
        for pid in stubs:
            maps = Path(f"/proc/{pid}/maps").read_text()
            rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
            model = next((m for m in M.MODELS if m in Path(f"/proc/{pid}/cmdline").read_text()), "?")
            print(f"stub {pid} ({model}): RSS {rss:.0f} MiB")
            assert "libtorch" not in maps, f"the stub of {model} loaded torch"
