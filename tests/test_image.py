"""The production image, read statically (no Docker daemon here: `docker build` cannot run, and
this docker client has no `build --check`): the Dockerfile's instructions are parsed and the
decisions docs/GPU.md states are checked against them."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "a continuation runs past the end of the Dockerfile"
    return out


def test_dockerfile_parses_and_copies_only_what_exists():
    ins = instructions()
    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "VOLUME", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT"}
    assert {w for w, _ in ins} <= known
    assert ins[0] == ("FROM", "nvcr.io/nvidia/tritonserver:24.12-py3") or ins[0][0] == "ARG"
    for word, rest in ins:
        if word == "COPY":
            *sources, _ = shlex.split(rest)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the build context"
    args = {r.split("=")[0] for w, r in ins if w == "ARG"}
    for word, rest in ins:
        if word == "RUN":
            for used in re.findall(r"\$\{(\w+)\}", rest):
                assert used in args or used in {"FILIP_PROJECT"}, f"RUN uses ${{{used}}} which no ARG defines"


def test_image_torch_tensorrt_merges_and_health():
    ins = instructions()
    runs = [r for w, r in ins if w == "RUN"]
    text = "\n".join(runs)
    # D3: torch from the CPU index, before the project (whose torch==2.13.0 pin it then satisfies)
    torch_run = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    project_run = next(i for i, r in enumerate(runs) if "./client" in r and '".[gpu]"' in r)
    assert torch_run < project_run and "--index-url" in runs[torch_run]
    arg = dict(r.split("=", 1) for w, r in ins if w == "ARG" and "=" in r)
    assert arg["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu" and arg["TORCH_VERSION"].endswith("+cpu")
    # D4: the bindings only, no stub that pulls the libraries
    assert "tensorrt-cu12==" not in (ROOT / "Dockerfile").read_text()
    assert arg["TENSORRT_BINDINGS"] == "tensorrt-cu12-bindings==10.7.0"
    assert re.search(r"pip install --no-deps \"\$\{TENSORRT_BINDINGS\}\"", text)
    assert "libnvonnxparser.so.10" in text and "libnvinfer_plugin.so.10" in text
    # D5: the merges file
    assert "--no-deps open_clip_torch==3.3.0" in text
    # build-time checks, then the deep health check
    assert "docker/check_image.py" in text and (ROOT / "docker" / "check_image.py").is_file()
    health = next(r for w, r in ins if w == "HEALTHCHECK")
    assert "/opt/filip/docker/healthcheck.sh" in health and "--start-period=900s" in health
    probe = (ROOT / "docker" / "healthcheck.sh").read_text()
    assert "filip_client.health" in probe and "--deep" in probe and "/v2/health/ready" not in probe.split("\n", 3)[-1]
    # the gpu extra: NVML, no TensorRT stub
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert any(d.startswith("nvidia-ml-py==") for d in gpu) and not any(d.startswith("tensorrt") for d in gpu)


def test_entrypoint_builds_per_architecture():
    s = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "filip_export.trt missing" in s and "CUDA_VISIBLE_DEVICES=" in s
    assert 'for gpu in "${gpus[@]}"' in s


def test_dependency_layer_stubs_every_listed_package(tmp_path):
    """The layer that installs the dependencies sees only the pyproject files: the stub script
    makes a folder for every package both list (the client's list grows: filip_gateway)."""
    import shutil
    import subprocess
    import sys
    for f in ("pyproject.toml", "client/pyproject.toml"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    r = subprocess.run([sys.executable, str(ROOT / "docker" / "stub_packages.py"), str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    made = {Path(x).parent.relative_to(tmp_path).as_posix() for x in r.stdout.split()}
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {"engine", "export"} <= made and {f"client/{p}" for p in client} <= made
