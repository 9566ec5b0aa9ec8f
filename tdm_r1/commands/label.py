"""`tdm-r1 label`: the labelling page of a run (tdm_r1/labels/server.py), its labellers and the export of its labels."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tdm_r1.commands.common import add_server_args, run_server
from tdm_r1.config import ConfigError

log = logging.getLogger(__name__)
DESCRIPTION = (
    "Serve the labelling page of a run whose `human` reward waits for likes: people open "
    "http://HOST:PORT/#token=TOKEN, see the epoch's samples with their prompts and like or dislike them; the labels go "
    "to RUN_DIR/labels.sqlite, where the trainer reads them. --add-labeller NAME prints a new labeller's token; "
    "--export FILE writes every label to a .jsonl or .csv file. Binds 127.0.0.1 unless --host says otherwise."
)


def register(sub) -> None:
    p = sub.add_parser("label", help="serve the labelling page of a run (human likes)", description=DESCRIPTION)
    p.add_argument("--run", required=True, help="the run directory (its labels.sqlite is created if missing)")
    add_server_args(p, 8780, "API requests")
    p.add_argument("--add-labeller", metavar="NAME", help="register a labeller (or renew their token), print the token")
    p.add_argument("--export", metavar="FILE", help="write every label to FILE (.jsonl or .csv) and exit")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from tdm_r1.labels.server import LabelService, build_app
    from tdm_r1.labels.store import LabelError, LabelStore

    run = Path(args.run)
    if not run.is_dir():
        raise ConfigError(f"--run {args.run}: no such run directory")
    store = LabelStore.of_run(run)
    try:
        if args.add_labeller:
            print(store.add_labeller(args.add_labeller))
            return 0
        if args.export:
            n = store.export(args.export)
            print(f"label: wrote {n} labels to {args.export}")
            return 0
    except LabelError as e:
        raise ConfigError(str(e)) from e
    if not store.labellers():
        log.warning("label: %s has no labellers yet: add one with --add-labeller NAME", run)
    service = LabelService(store, args.max_requests)

    def announce(port: int) -> None:
        print(f"label: {run} on http://{args.host}:{port}/#token=TOKEN", flush=True)
        local = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        store.set_state(label_url=f"http://{local}:{port}")  # where `tdm-r1 label-sim` finds the page

    run_server(args, "label", build_app(service), lambda: service.stop, announce)
    print(f"label: stopped after {service.answered} requests", flush=True)
    store.close()
    return 0
