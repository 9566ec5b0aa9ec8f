"""Servers in subprocesses on loopback (the reward server, the labelling page), each stopping by itself
(--max-seconds) and terminated after use."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOKEN = "s3cret-token-for-tests-0123456789"


class _Process:
    """A `python -m tdm_r1 <command> --port 0 --port-file F ...` subprocess, its log and its URL once listening."""

    def _start(self, tmp: Path, name: str, command: list[str], extra: tuple[str, ...]) -> None:
        """`extra` comes last: a --port there replaces the free one."""
        port_file = tmp / f"{name}.port"
        port_file.unlink(missing_ok=True)
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
        cmd = [sys.executable, "-m", "tdm_r1", *command, "--port", "0", "--port-file", str(port_file), "--max-seconds",
               "300", *extra]  # fmt: skip
        self.log_path = tmp / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.time() + 120
        while not port_file.exists() or not port_file.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{command[0]} did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        return self.log_path.read_text()


class Server(_Process):
    """`tdm-r1 reward-server --reward REWARD` with the test token."""

    def __init__(self, tmp: Path, reward: str, *args: str):
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        self._start(tmp, "server", ["reward-server", "--reward", reward, "--token-file", str(self.token_file)], args)


class LabelServer(_Process):
    """`tdm-r1 label --run RUN`."""

    def __init__(self, tmp: Path, run: Path, *args: str):
        self._start(tmp, "label", ["label", "--run", str(run)], args)
