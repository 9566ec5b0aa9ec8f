"""`tdm-r1 <command>`: pretrain, distill, train, export, report, sample, eval."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from tdm_r1 import distributed
from tdm_r1.checkpoint import CheckpointError
from tdm_r1.config import ConfigError
from tdm_r1.optim import NonFiniteError
from tdm_r1.rewards.base import RewardFailureError
from tdm_r1.run import RunStopped
from tdm_r1.worlds.ocr import PromptFileError

COMMANDS = ("pretrain", "distill", "train", "export", "report", "sample", "eval", "bench", "plan", "reward-server",
            "label", "label-sim")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """Every command registers its own arguments (tdm_r1.commands.<name>.register)."""
    parser = argparse.ArgumentParser(prog="tdm-r1", description="Few-step flow models trained with TDM / TDM-R1.")
    # the `deepspeed` launcher passes --local_rank=N before the command; the rank is read from LOCAL_RANK instead
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"tdm_r1.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A process of a distributed launch ends here (distributed.finish: os._exit)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ConfigError, CheckpointError, PromptFileError, RewardFailureError, NonFiniteError, OSError) as e:
        print(f"tdm-r1 {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except RunStopped as e:  # SIGINT / SIGTERM: a state was written
        print(str(e), file=sys.stderr)
        code = 130
    except BaseException:
        if not distributed.launched():
            raise
        traceback.print_exc()
        code = 1
    return distributed.finish(code)


if __name__ == "__main__":
    sys.exit(main())
