"""The install path the README gives: a wheel built from this checkout holds every package and the embedded model.

`pip install 'nanogpt-deploy[cpu]'` needs a package index that has the project; it is not published, so the
tested path is a clone or a built wheel (`pip install '.[cpu]'`, `pip wheel --no-deps .`, `python -m build`).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["model", "export", "runtime", "runtime/backends", "runtime/cli", "runtime/generation", "runtime/serve",
            "runtime/tools"]


def test_wheel_holds_every_package_and_the_embedded_model(tmp_path):
    src = tmp_path / "src"  # build from a copy: the build leaves build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("model", "export", "runtime"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", ".", "-w", str(tmp_path / "dist")],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"pip wheel failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    (wheel,) = (tmp_path / "dist").glob("nanogpt_deploy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in PACKAGES:  # every .py file of each package, so a package left out by packages.find shows by name
        expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / pkg).glob("*.py")}
        assert expected, pkg
        missing = sorted(expected - names)
        assert not missing, f"{wheel.name} lacks {missing}; check [tool.setuptools.packages.find] in pyproject.toml"
    weights = {p.relative_to(ROOT).as_posix() for p in (ROOT / "model/weights/pycode").iterdir() if p.is_file()}
    missing = sorted(weights - names)
    assert not missing, f"{wheel.name} lacks {missing}; check [tool.setuptools.package-data] in pyproject.toml"
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "nanogpt-deploy = runtime.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    assert not any(n.startswith(("tests/", "scripts/")) for n in names), "tests/ and scripts/ stay out of the wheel"
