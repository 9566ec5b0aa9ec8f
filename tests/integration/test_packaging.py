"""The installed distribution: the fused ops install as `tdm_r1_kernels`, never under the bare name `kernels` (another
PyPI package's import name, which transformers and diffusers probe for)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_has_no_top_level_kernels_package(tmp_path):
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        src.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for folder in ("tdm_r1", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."]
    subprocess.run(cmd, cwd=src, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("tdm_r1-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if "/" in n and ".dist-info" not in n}
    assert tops == {"tdm_r1", "tdm_r1_kernels"}, tops
    for module in ("tdm_r1_kernels/__init__.py", "tdm_r1_kernels/reference.py", "tdm_r1_kernels/csrc/common.h"):
        assert module in names, module
    packages = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "tdm_r1").rglob("__init__.py"))
    for package in packages:  # every subpackage of the source tree ships, and every module in it
        assert f"{package}/__init__.py" in names, package
        for module in (ROOT / package).glob("*.py"):
            assert f"{package}/{module.name}" in names, module


def test_the_installed_package_claims_tdm_r1_kernels_not_kernels(tmp_path):
    probe = (
        "import importlib.util, tdm_r1_kernels, tdm_r1.sampling\n"
        "print(importlib.util.find_spec('kernels') is None, tdm_r1_kernels.fused_sampler_step.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "tdm_r1_kernels.sampler_step"]
