"""A simulated labeller (`tdm-r1 label-sim`): it labels a run's images through the labelling page's HTTP API, as a
person would, with a rule a person might follow and a share of flipped labels (noise).

Rules (RULES):
- ocr_exact: likes a sample whose text the OCR engine reads exactly as the prompt quotes it (`a sign that says "CAT"`);
- count_right: likes a sample with exactly the objects the prompt asks for (`3 red squares`; the counting reward's
  strict score);
- dark: likes a sample that is mostly dark (mean luma below 0.5): a cheap rule for tests.

It registers itself as a labeller in the run's store (its name, a fresh token) and finds the page's address there
(written by `tdm-r1 label` when it starts listening), so both processes need only the run directory.
"""

from __future__ import annotations

import json
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import torch

from tdm_r1.rewards.wire import png_tensor

Rule = Callable[[torch.Tensor, list[str]], list[bool]]  # images [B, 3, H, W], prompts -> like?


def _ocr_exact() -> Rule:
    from tdm_r1.rewards.base import build_reward

    ocr = build_reward("ocr")

    def rule(images: torch.Tensor, prompts: list[str]) -> list[bool]:
        words = [m.group(1) if (m := re.search(r'"([^"]*)"', p)) else None for p in prompts]
        readings = ocr.read(images)
        return [w is not None and r == w for r, w in zip(readings, words, strict=True)]

    return rule


def _count_right() -> Rule:
    from tdm_r1.rewards.counting import CountingOptions, count_score, find_objects
    from tdm_r1.worlds.counting import parse_prompt

    def rule(images: torch.Tensor, prompts: list[str]) -> list[bool]:
        out = []
        for x, p in zip(images, prompts, strict=True):
            try:
                target = parse_prompt(p).target()
            except ValueError:
                out.append(False)
                continue
            out.append(count_score(find_objects(x.permute(1, 2, 0).numpy(), CountingOptions()), target, "strict") == 1)
        return out

    return rule


def _dark() -> Rule:
    def rule(images: torch.Tensor, prompts: list[str]) -> list[bool]:
        luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
        return (luma.flatten(1).mean(1) < 0.5).tolist()

    return rule


RULES: dict[str, Callable[[], Rule]] = {"ocr_exact": _ocr_exact, "count_right": _count_right, "dark": _dark}


class Client:
    """The labelling page's JSON API, as the page's script calls it."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url.rstrip("/"), token

    def call(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST")
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
            return raw if r.headers.get("Content-Type", "").startswith("image/") else json.loads(raw)


def label_loop(client: Client, rule: Rule, flip: float, seed: int, max_seconds: float, poll_s: float = 0.5) -> int:
    """Label every image of the newest epoch this labeller has not labelled, again and again, until `max_seconds`
    pass; returns how many labels were given. Server errors (it restarted, the trainer moved on) are retried."""
    rng = random.Random(seed)
    given, deadline = 0, time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        try:
            todo = [x for x in client.call("/api/state")["images"] if x["label"] is None]
            if todo:
                images = torch.stack([png_tensor(client.call(f"/api/image/{x['id']}"), i, 4096)
                                      for i, x in enumerate(todo)])  # fmt: skip
                likes = rule(images, [x["prompt"] for x in todo])
                for x, like in zip(todo, likes, strict=True):
                    label = int(like) ^ int(rng.random() < flip)
                    client.call("/api/label", {"id": x["id"], "label": label})
                    given += 1
                continue
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            print(f"label-sim: {e}; retrying", flush=True)
        time.sleep(poll_s)
    return given
