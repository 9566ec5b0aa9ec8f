"""Reward servers in subprocesses on loopback, each stopping by itself (--max-seconds) and terminated after use."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOKEN = "s3cret-token-for-tests-0123456789"


class Server:
    def __init__(self, tmp: Path, reward: str, *args: str):
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        port_file = tmp / "port"
        env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
        cmd = [sys.executable, "-m", "tdm_r1", "reward-server", "--reward", reward, "--port", "0", "--port-file",
               str(port_file), "--token-file", str(self.token_file), "--max-seconds", "300", *args]  # fmt: skip
        self.log = open(tmp / "server.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.time() + 120
        while not port_file.exists() or not port_file.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"reward-server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
        self.tmp = tmp

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        return (self.tmp / "server.log").read_text()
