"""Session fixtures: the tiny SD3 / Z-Image folders (tiny_models.py) and the adapters loaded from them."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import build_tiny_sd3, build_tiny_zimage, one_thread, tiny_cfg


@pytest.fixture(autouse=True)
def _single_threaded():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory) -> Path:
    with one_thread():
        return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def zimage_dir(tmp_path_factory) -> Path:
    with one_thread():
        return build_tiny_zimage(tmp_path_factory.mktemp("tiny_zimage"))


@pytest.fixture(scope="session")
def sd3_model(sd3_dir):
    from tdm_r1.models.sd3 import load_sd3

    with one_thread():
        return load_sd3(tiny_cfg(sd3_dir, "sd3"))


@pytest.fixture(scope="session")
def zimage_model(zimage_dir):
    from tdm_r1.models.zimage import load_zimage

    with one_thread():
        return load_zimage(tiny_cfg(zimage_dir, "zimage"))
