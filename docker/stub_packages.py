"""Dependency layer of the Dockerfile: empty package folders for every package the two
pyproject.toml files list, so `pip install ./client .` resolves and installs the pinned
dependencies before the sources are copied (that layer then survives source edits).

    python3 docker/stub_packages.py ROOT
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def stub(root: Path) -> list[Path]:
    made = []
    for project in (root, root / "client"):
        tool = tomllib.loads((project / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
        dirs = tool.get("package-dir", {})
        for package in tool.get("packages", []):
            folder = project / dirs.get(package, package.replace(".", "/"))
            folder.mkdir(parents=True, exist_ok=True)
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text("")
            made.append(init)
    return made


if __name__ == "__main__":
    for p in stub(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(p)
