"""``tritonserver`` on PATH: the real Triton Inference Server.

Inside NVIDIA's Triton container the native ``/opt/tritonserver/bin/tritonserver`` is run.
Elsewhere (any Linux x86-64 machine) this runs the Triton 2.51 server shipped inside the
``nvidia-pytriton`` wheel, which needs three things the wheel does not arrange for a plain
command line, and which this launcher does before ``exec``:

1. ``LD_LIBRARY_PATH`` pointing at the wheel's bundled shared libraries (``nvidia_pytriton.libs``);
2. the Python-backend stub built for the running Python copied into the python backend folder;
3. ``--backend-directory`` set to the wheel's backends (unless given), and this environment's
   ``bin`` first on ``PATH`` so each model's stub runs with this environment's packages
   (numpy, onnxruntime, this project).

Every flag passes through unchanged (``--model-repository``, ``--grpc-port``, ``--http-port``,
``--metrics-port``, ...).
"""
from __future__ import annotations

import filecmp
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

NATIVE = Path("/opt/tritonserver/bin/tritonserver")


def pytriton_server() -> tuple[Path, Path, Path]:
    """(binary, backends dir, bundled libs dir) of the server inside nvidia-pytriton."""
    spec = importlib.util.find_spec("pytriton")   # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("tritonserver: neither NVIDIA's native server (/opt/tritonserver) nor the nvidia-pytriton "
                         "package is installed; run `make venv` (or pip install nvidia-pytriton)")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise SystemExit(f"tritonserver: {binary} is missing from the nvidia-pytriton package")
    return binary, root / "backends", libs


def install_stub(backends: Path) -> Path:
    """Put the stub for this Python into the python backend folder (idempotent)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = backends.parent / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not src.is_file():
        raise SystemExit(f"tritonserver: nvidia-pytriton ships no Python-backend stub for Python {version}")
    dst = backends / "python" / "triton_python_backend_stub"
    if not dst.is_file() or not filecmp.cmp(src, dst, shallow=False):
        tmp = dst.with_suffix(".tmp")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    return dst


def command(argv: list[str]) -> tuple[str, list[str], dict[str, str]]:
    """The program, its arguments and its environment."""
    env = dict(os.environ)
    if NATIVE.is_file():
        return str(NATIVE), [str(NATIVE), *argv], env
    binary, backends, libs = pytriton_server()
    install_stub(backends)
    # This interpreter's own libpython first: otherwise the stub may embed a system libpython of
    # another patch release than the standard library it then runs with.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    args = list(argv)
    if not any(a == "--backend-directory" or a.startswith("--backend-directory=") for a in args):
        args = [f"--backend-directory={backends}", *args]
    return str(binary), [str(binary), *args], env


def main(argv: list[str] | None = None) -> None:
    program, args, env = command(sys.argv[1:] if argv is None else argv)
    os.execve(program, args, env)


if __name__ == "__main__":
    main()
