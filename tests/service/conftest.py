"""The module's judge server (tests/service/servers.py starts it)."""

from __future__ import annotations

import pytest
from servers import Server


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("judge"), "judge_reward:build_judge", "--max-images", "8",
                    "--max-body-mb", "1", "--queue", "8", "--set", "batch_size=8")  # fmt: skip
    yield server
    server.stop()
