"""`tdm-r1 label-sim`: a simulated labeller labelling a run's images through its page (tdm_r1/labels/sim.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tdm_r1.config import ConfigError

DESCRIPTION = (
    "Label a run's images through its labelling page (`tdm-r1 label --run RUN_DIR`, found through the run's label "
    "store) as a person following a rule would: ocr_exact (likes text read exactly), count_right (likes the asked "
    "objects, exactly), dark (mostly dark images; for tests); --flip P flips each label with probability P."
)


def register(sub) -> None:
    from tdm_r1.labels.sim import RULES

    p = sub.add_parser("label-sim", help="a simulated labeller for a run's labelling page", description=DESCRIPTION)
    p.add_argument("--run", required=True, help="the run directory (its labelling page must be running)")
    p.add_argument("--rule", required=True, choices=sorted(RULES))
    p.add_argument("--flip", type=float, default=0.0, help="probability of flipping each label (noise)")
    p.add_argument("--seed", type=int, default=0, help="seed of the flips")
    p.add_argument("--name", default="sim", help="labeller name (registered with a fresh token)")
    p.add_argument("--url", default=None, help="the page's address (default: the one `tdm-r1 label` recorded)")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="stop after this long")
    p.add_argument("--wait-for-server", type=float, default=120.0, help="seconds to wait for the page to start")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from tdm_r1.labels.sim import RULES, Client, label_loop
    from tdm_r1.labels.store import LabelError, LabelStore

    if not 0.0 <= args.flip <= 1.0:
        raise ConfigError(f"--flip must be in [0, 1], got {args.flip}")
    if not Path(args.run).is_dir():
        raise ConfigError(f"--run {args.run}: no such run directory")
    store = LabelStore.of_run(args.run)
    try:
        token = store.add_labeller(args.name)
    except LabelError as e:
        raise ConfigError(str(e)) from e
    url, deadline = args.url, time.monotonic() + args.wait_for_server
    while url is None:
        url = store.state().get("label_url")
        if url is None:
            if time.monotonic() > deadline:
                raise ConfigError(f"no labelling page recorded in {args.run}: start `tdm-r1 label --run {args.run}`")
            time.sleep(0.5)
    store.close()
    rule = RULES[args.rule]()
    print(f"label-sim: {args.name} labels {url} by rule {args.rule}, flip {args.flip}", flush=True)
    given = label_loop(Client(url, token), rule, args.flip, args.seed, args.max_seconds)
    print(f"label-sim: gave {given} labels", flush=True)
    return 0
