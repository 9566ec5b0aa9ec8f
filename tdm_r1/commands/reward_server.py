"""`tdm-r1 reward-server`: serve a registered reward over HTTP for `remote` rewards (tdm_r1/rewards/server.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

from tdm_r1.commands.common import add_server_args, add_set_arg, run_server
from tdm_r1.config import ConfigError, RewardTermConfig

DESCRIPTION = (
    "Serve one reward (OCR, PickScore, GenEval, the toy rewards, or your own by import path) at POST /score with "
    "bearer-token auth, request limits and batching across clients; GET /health reports it. Binds 127.0.0.1 unless "
    "--host says otherwise."
)


def register(sub) -> None:
    p = sub.add_parser("reward-server", help="serve a reward over HTTP (for `remote` rewards)", description=DESCRIPTION)
    p.add_argument("--reward", required=True, help="a registered reward name or an import path module:factory")
    add_set_arg(p, "the reward's entry: path, device, batch_size, or one of its options (repeatable)")
    add_server_args(p, 8765, "requests")
    p.add_argument("--token-file", required=True, help="file holding the bearer token clients must send")
    p.add_argument("--max-body-mb", type=float, default=64.0)
    p.add_argument("--max-images", type=int, default=64, help="images per request")
    p.add_argument("--max-side", type=int, default=2048, help="pixels, either side of an image")
    p.add_argument("--queue", type=int, default=512, help="images waiting at most; beyond, 503")
    p.set_defaults(func=main)


def reward_term(name: str, overrides: list[str]) -> RewardTermConfig:
    """The reward's train.rewards-like entry from --set KEY=VALUE (values parsed as YAML)."""
    fields = {f.name for f in dataclasses.fields(RewardTermConfig)} - {"name", "weight", "options"}
    term = RewardTermConfig(name=name)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        value = yaml.safe_load(raw)
        if key in fields:
            setattr(term, key, value)
        else:
            term.options[key.removeprefix("options.")] = value
    return term


def main(args: argparse.Namespace) -> int:
    from tdm_r1.rewards.base import build_reward
    from tdm_r1.rewards.server import Limits, RewardService, build_app

    token_path = Path(args.token_file)
    if not token_path.is_file():
        raise ConfigError(f"--token-file {args.token_file}: no such file")
    token = token_path.read_text().strip()
    if len(token) < 16:
        raise ConfigError(f"--token-file {args.token_file}: the token must have at least 16 characters")
    term = reward_term(args.reward, args.overrides)
    reward = build_reward(term)
    limits = Limits(args.max_body_mb, args.max_images, args.max_side, args.queue, max(1, term.batch_size))
    service = RewardService(reward, term, token, limits, args.max_requests)

    def announce(port: int) -> None:
        print(f"reward-server: {term.name} on http://{args.host}:{port}", flush=True)

    run_server(args, "reward-server", build_app(service), lambda: service.stop, announce)
    print(f"reward-server: stopped after {service.answered} requests ({service.served} scored)", flush=True)
    return 0
