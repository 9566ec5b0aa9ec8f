"""The crash tests' child process: runs one `tdm-r1` command and SIGKILLs itself at a chosen moment of the run's own
progress, so the kill lands where it is meant to (a timer from outside would land anywhere).

    python tests/crash_harness.py MOMENT N tdm-r1-args...

MOMENT, at its N-th occurrence:
  rollout      after a micro-batch's K-step sampler (train)
  update       after a fake-score backward (train, distill)
  step         after a pretrain step's backward, before its optimizer step (pretrain)
  state_write  a training state's temporary file written, not yet renamed into place
  log_write    half of a metrics.jsonl line written and flushed
  export       the result's temporary file written (generator / student / teacher.safetensors), not yet renamed
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

MOMENTS = ("rollout", "update", "step", "state_write", "log_write", "export")
RESULTS = ("generator.safetensors", "student.safetensors", "teacher.safetensors")


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(moment: str, n: int) -> None:
    seen = [0]

    def hit() -> bool:
        seen[0] += 1
        return seen[0] == n

    def after(module, name: str) -> None:
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            if hit():
                die()
            return out

        setattr(module, name, wrapped)

    if moment == "rollout":
        import tdm_r1.phases as phases

        after(phases, "rollout")
    elif moment == "update":
        import tdm_r1.phases as phases

        after(phases, "fake_score_backward")
    elif moment == "step":
        import tdm_r1.commands.pretrain as pretrain

        after(pretrain, "flow_matching_loss")
    elif moment in ("state_write", "export"):
        import tdm_r1.checkpoint as ckpt

        real_write = ckpt.atomic_write

        def atomic_write(path, write_fn):
            name = Path(path).name
            chosen = name.startswith("state_") if moment == "state_write" else name in RESULTS
            if not chosen:
                return real_write(path, write_fn)

            def write_then_maybe_die(tmp):
                write_fn(tmp)
                if hit():
                    die()

            return real_write(path, write_then_maybe_die)

        ckpt.atomic_write = atomic_write
    elif moment == "log_write":
        from tdm_r1.report import JsonlLogger

        real_log = JsonlLogger.log

        def log(self, record):
            if hit():
                import json

                line = json.dumps(record, sort_keys=True) + "\n"
                self._f.write(line[: len(line) // 2])
                self._f.flush()
                die()
            real_log(self, record)

        JsonlLogger.log = log
    else:
        raise SystemExit(f"unknown moment {moment!r}; one of {MOMENTS}")


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    from tdm_r1.cli import main

    sys.exit(main(sys.argv[3:]))
