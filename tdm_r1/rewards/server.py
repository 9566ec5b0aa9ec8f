"""`tdm-r1 reward-server`: any registered reward behind HTTP, for trainers on other machines (the `remote` reward).

Built on aiohttp (server only; the trainer's client is the standard library): one maintained package that gives an
asyncio server with request-size limits and graceful shutdown, without a web framework's dependency tree. Requests are
decoded on the event loop and queued; one worker takes queued requests of the same image size together, up to the
reward's batch size (requests from several trainer ranks share a reward call), and runs the reward on a thread so
the loop keeps answering. Routes (wire format: tdm_r1/rewards/wire.py):

  POST /score    bearer token; 400 malformed JSON / field / PNG (naming it), 401 no or wrong token, 413 body or image
                 count over the limit, 503 queue full (Retry-After), 500 when the reward raised on this request
  GET  /health   no token: reward, options, device, version, queue depth, requests served, p50 / p95 latency

A sample the reward cannot judge (NaN) is answered as null with its error; the rest are still scored. When a batch of
several requests raises, each request is retried alone, so one bad request fails only itself.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from tdm_r1.config import RewardTermConfig
from tdm_r1.rewards.base import Reward, score_images
from tdm_r1.rewards.wire import WireError, decode_png
from tdm_r1.serving import json_error

log = logging.getLogger(__name__)
NOT_JUDGED = "the reward could not judge this sample"


@dataclass
class Limits:
    max_body_mb: float = 64.0  # request body
    max_images: int = 64  # images per request
    max_side: int = 2048  # pixels, either side
    queue_images: int = 512  # images decoded and waiting for the reward; beyond: 503
    batch_size: int = 32  # images per reward call (requests batched together up to this)


@dataclass
class _Job:
    images: torch.Tensor
    prompts: list[str]
    targets: list[dict]
    done: asyncio.Future
    size: tuple[int, int] = field(init=False)

    def __post_init__(self):
        self.size = tuple(self.images.shape[-2:])


class RewardService:
    """The state behind the routes: the reward, its queue, the worker and the figures /health reports."""

    def __init__(self, reward: Reward, term: RewardTermConfig, token: str, limits: Limits, max_requests: int = 0):
        self.reward, self.term, self.token, self.limits = reward, term, token, limits
        self.jobs: deque[_Job] = deque()
        self.queued = 0  # images in self.jobs
        self.wakeup: asyncio.Event | None = None
        self.served = 0  # requests the reward answered (scored or failed)
        self.answered = 0  # every /score answer, refusals included
        self.latencies: deque[float] = deque(maxlen=2000)
        self.max_requests = max_requests  # > 0: stop after this many /score answers (tests)
        self.stop: asyncio.Event | None = None

    # -- routes ------------------------------------------------------------------------------------------------
    async def health(self, request):
        from importlib.metadata import PackageNotFoundError, version

        from aiohttp import web

        try:
            release = version("tdm-r1")
        except PackageNotFoundError:
            release = "unknown"
        lat = sorted(self.latencies)
        pct = lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None  # noqa: E731
        return web.json_response(
            {
                "status": "ok",
                "reward": self.term.name,
                "options": dict(self.term.options),
                "device": self.term.device,
                "version": release,
                "queue_depth": self.queued,
                "requests_served": self.served,
                "latency_ms": {"p50": pct(0.5), "p95": pct(0.95)},
            }
        )

    async def score(self, request):
        try:
            return await self._score(request)
        finally:
            self.answered += 1
            if self.max_requests and self.answered >= self.max_requests and self.stop is not None:
                self.stop.set()

    async def _score(self, request):
        from aiohttp import web

        t0 = time.perf_counter()
        if not self._authorised(request):
            return json_error(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        if request.content_length is not None and request.content_length > self.limits.max_body_mb * 2**20:
            return json_error(
                413, f"request body of {request.content_length} bytes exceeds {self.limits.max_body_mb} MB"
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"request body exceeds {self.limits.max_body_mb} MB")
        try:
            request_id, images, prompts, targets = self._parse(body)
        except WireError as e:
            return json_error(413 if "limit of" in str(e) else 400, str(e))
        if self.queued + len(prompts) > self.limits.queue_images:
            return json_error(503, f"queue full ({self.queued} images waiting)", headers={"Retry-After": "1"})
        job = _Job(images, prompts, targets, asyncio.get_running_loop().create_future())
        self.jobs.append(job)
        self.queued += len(prompts)
        self.wakeup.set()
        try:
            scores = await job.done
        except Exception as e:  # the reward raised on this request (alone)
            self._count(t0)
            return json_error(500, f"the reward failed on this request: {type(e).__name__}: {e}")
        self._count(t0)
        ok = [math.isfinite(s) for s in scores]
        return web.json_response(
            {
                "request_id": request_id,
                "scores": [s if good else None for s, good in zip(scores, ok, strict=True)],
                "errors": [None if good else NOT_JUDGED for good in ok],
            }
        )

    def _count(self, t0: float) -> None:
        self.served += 1
        self.latencies.append(time.perf_counter() - t0)

    def _authorised(self, request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def _parse(self, body: bytes):
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WireError(f"body is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise WireError("body: expected a JSON object")
        request_id = data.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise WireError("request_id: expected a non-empty string")
        images, prompts = data.get("images"), data.get("prompts")
        if not isinstance(images, list) or not images:
            raise WireError("images: expected a non-empty list of base64 PNG strings")
        if len(images) > self.limits.max_images:
            raise WireError(f"images: {len(images)} exceed the limit of {self.limits.max_images} per request")
        if not isinstance(prompts, list) or len(prompts) != len(images) or not all(isinstance(p, str) for p in prompts):
            raise WireError(f"prompts: expected {len(images)} strings, one per image")
        targets = data.get("metadata", [{}] * len(images))
        if (
            not isinstance(targets, list)
            or len(targets) != len(images)
            or not all(isinstance(t, dict) for t in targets)
        ):
            raise WireError(f"metadata: expected {len(images)} objects, one per image")
        decoded = [decode_png(img, i, self.limits.max_side) for i, img in enumerate(images)]
        if len({tuple(x.shape) for x in decoded}) > 1:
            raise WireError("images: every image of a request must have the same size")
        return request_id, torch.stack(decoded), prompts, targets

    # -- the worker --------------------------------------------------------------------------------------------
    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.jobs:
                batch = self._take()
                try:
                    results = await loop.run_in_executor(None, self._run, batch)
                except Exception:  # isolate: each request alone, so only the one that raises fails
                    results = []
                    for job in batch:
                        try:
                            results.append(await loop.run_in_executor(None, self._run, [job]))
                        except Exception as e:
                            results.append(e)
                    results = [r[0] if isinstance(r, list) else r for r in results]
                for job, res in zip(batch, results, strict=True):
                    self.queued -= len(job.prompts)
                    if job.done.done():
                        continue
                    if isinstance(res, Exception):
                        job.done.set_exception(res)
                    else:
                        job.done.set_result(res)

    def _take(self) -> list[_Job]:
        """Queued jobs of the first job's image size, in order, up to the batch size (at least one job)."""
        first = self.jobs.popleft()
        batch, n = [first], len(first.prompts)
        rest: deque[_Job] = deque()
        while self.jobs:
            job = self.jobs.popleft()
            if job.size == first.size and n + len(job.prompts) <= self.limits.batch_size:
                batch.append(job)
                n += len(job.prompts)
            else:
                rest.append(job)
        self.jobs.extendleft(reversed(rest))
        return batch

    def _run(self, batch: list[_Job]) -> list[list[float]]:
        images = torch.cat([j.images for j in batch])
        prompts = [p for j in batch for p in j.prompts]
        targets = [t for j in batch for t in j.targets]
        scores = score_images(self.reward, images, prompts, targets)
        if scores.shape != (images.shape[0],):
            raise ValueError(f"the reward returned shape {tuple(scores.shape)} for {images.shape[0]} images")
        out, start = [], 0
        for j in batch:
            out.append([float(s) for s in scores[start : start + len(j.prompts)]])
            start += len(j.prompts)
        return out


def build_app(service: RewardService):
    from aiohttp import web

    app = web.Application(client_max_size=int(service.limits.max_body_mb * 2**20) + 1)
    app.router.add_post("/score", service.score)
    app.router.add_get("/health", service.health)

    async def start_worker(app):
        service.wakeup, service.stop = asyncio.Event(), asyncio.Event()
        app["worker"] = asyncio.get_running_loop().create_task(service.worker())

    async def stop_worker(app):
        app["worker"].cancel()

    app.on_startup.append(start_worker)
    app.on_cleanup.append(stop_worker)
    return app
