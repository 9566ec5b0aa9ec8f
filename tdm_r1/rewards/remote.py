"""The `remote` reward: scores from a `tdm-r1 reward-server` (or any service speaking tdm_r1/rewards/wire.py).

    train:
      rewards:
        - name: remote
          options: {url: "http://10.0.0.5:8765", token_env: TDM_R1_REWARD_TOKEN, timeout_s: 60, retries: 4, chunk: 32}

The token comes from an environment variable or a file named in the options, never from the options themselves, so it
is not written into the run directory's config. Images go in chunks of `chunk`; each chunk is retried on connection
errors, timeouts, 429 and 5xx with exponential backoff and jitter; other 4xx answers are not retried (the request is
wrong, the message says why). A chunk that still fails is NaN for its samples (excluded from advantages, counted
against train.max_reward_failure). Answers are matched by request id and length. `take_stats` gives the latency
percentiles, retries and failures since it was last called (the trainer logs them per epoch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from tdm_r1.config import ConfigError, RewardTermConfig
from tdm_r1.rewards.base import reward_options
from tdm_r1.rewards.wire import encode_png

log = logging.getLogger(__name__)
RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass
class RemoteOptions:
    url: str = ""  # the service's base URL (http://host:port); /score is appended
    token_env: str = "TDM_R1_REWARD_TOKEN"  # environment variable holding the bearer token
    token_file: str = ""  # or a file holding it (takes precedence when set)
    timeout_s: float = 60.0  # per request
    retries: int = 4  # after the first try
    backoff_s: float = 0.5  # first wait; doubles per retry, times a random factor in [1, 2)
    chunk: int = 32  # images per request


class RemoteFailure(RuntimeError):
    pass


class RemoteReward:
    name = "remote"

    def __init__(self, opts: RemoteOptions, token: str):
        self.opts, self.token = opts, token
        self.rng = random.Random()
        self.latencies: list[float] = []
        self.retries = 0
        self.failures = 0
        self.last_error: str | None = None

    def __call__(self, images: torch.Tensor, prompts: list[str], targets: list[dict]) -> torch.Tensor:
        out = torch.full((images.shape[0],), math.nan)
        for start in range(0, images.shape[0], self.opts.chunk):
            stop = min(start + self.opts.chunk, images.shape[0])
            try:
                out[start:stop] = self._score_chunk(images[start:stop], prompts[start:stop], targets[start:stop])
            except RemoteFailure as e:
                self.failures += 1
                self.last_error = f"{self.opts.url}: {e}"
                log.warning("remote reward: %d samples unscored: %s", stop - start, self.last_error)
        return out

    def _score_chunk(self, images, prompts, targets) -> torch.Tensor:
        request_id = uuid.uuid4().hex
        body = json.dumps(
            {"request_id": request_id, "images": [encode_png(x) for x in images], "prompts": list(prompts),
             "metadata": [dict(t) for t in targets]}
        ).encode()  # fmt: skip
        answer = self._post(body)
        scores = answer.get("scores")
        if answer.get("request_id") != request_id or not isinstance(scores, list) or len(scores) != len(prompts):
            raise RemoteFailure(f"answer does not match request {request_id} ({len(prompts)} samples)")
        return torch.tensor([math.nan if s is None else float(s) for s in scores])

    def _post(self, body: bytes) -> dict:
        url = self.opts.url.rstrip("/") + "/score"
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}
        error = ""
        for attempt in range(self.opts.retries + 1):
            if attempt:
                self.retries += 1
                time.sleep(self.opts.backoff_s * 2 ** (attempt - 1) * (1.0 + self.rng.random()))
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(url, data=body, headers=headers, method="POST"), timeout=self.opts.timeout_s
                ) as resp:
                    answer = json.loads(resp.read())
                self.latencies.append(time.perf_counter() - t0)
                return answer
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}: {_message(e)}"
                if e.code not in RETRY_STATUS:
                    raise RemoteFailure(error) from e
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                error = f"answer is not JSON: {e}"
        raise RemoteFailure(f"{error} (after {self.opts.retries + 1} tries)")

    def take_stats(self) -> dict[str, float]:
        """Latency p50 / p95 (ms), retries and failed chunks since the last call."""
        lat = sorted(self.latencies)
        pct = lambda q: 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else math.nan  # noqa: E731
        out = {"latency_p50_ms": pct(0.5), "latency_p95_ms": pct(0.95), "retries": self.retries,
               "failed_chunks": self.failures}  # fmt: skip
        self.latencies, self.retries, self.failures = [], 0, 0
        return out


def _message(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read()).get("error", e.reason)
    except Exception:
        return str(e.reason)


def build_remote(term: RewardTermConfig) -> RemoteReward:
    opts = reward_options(term, RemoteOptions)
    if not opts.url.startswith(("http://", "https://")):
        raise ConfigError(f"train.rewards[remote].options.url must be an http(s) URL, got {opts.url!r}")
    if opts.chunk < 1 or opts.retries < 0 or opts.timeout_s <= 0:
        raise ConfigError("train.rewards[remote].options: chunk >= 1, retries >= 0 and timeout_s > 0 are required")
    if opts.token_file:
        path = Path(opts.token_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"train.rewards[remote].options.token_file {opts.token_file!r}: no such file")
        token = path.read_text().strip()
    else:
        token = os.environ.get(opts.token_env, "").strip()
        if not token:
            raise ConfigError(
                f"train.rewards[remote]: no token: set the environment variable {opts.token_env} "
                "(options.token_env) or options.token_file"
            )
    return RemoteReward(opts, token)
