"""Where a run's time goes: named phases timed in wall seconds and the model work counted in them.

The trainer marks its phases (`with phase("rollout"):`) and the roles count the samples each model call runs
(`count_forward`); both are no-ops unless a `Recorder` is active (`recording`), so a normal run pays one global
lookup per mark. A phase's seconds exclude the phases opened inside it. Counted per phase: `forwards` (samples through
a velocity call) and `grad_forwards` (those with autograd on, each followed by a backward of the same samples), so
forward-equivalents = forwards + 2 x grad_forwards (a backward costs about two forwards). On CUDA the clock waits for
the device at every mark, so a phase is charged for its own kernels.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class Recorder:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    forwards: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    grad_forwards: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    background: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # seconds on worker threads
    stack: list[list] = field(default_factory=list)  # [name, start, seconds of children]
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def current(self) -> str:
        return self.stack[-1][0] if self.stack else "other"

    def forward_equivalents(self, name: str | None = None) -> float:
        names = [name] if name is not None else list(self.forwards)
        return float(sum(self.forwards.get(n, 0) + 2 * self.grad_forwards.get(n, 0) for n in names))

    def as_dict(self) -> dict:
        names = sorted(set(self.seconds) | set(self.forwards) | set(self.background))
        return {
            n: {
                "seconds": round(self.seconds.get(n, 0.0), 4),
                "calls": self.calls.get(n, 0),
                "forwards": self.forwards.get(n, 0),
                "grad_forwards": self.grad_forwards.get(n, 0),
                "background_seconds": round(self.background.get(n, 0.0), 4),
            }
            for n in names
        }


_active: Recorder | None = None
_main_thread = threading.main_thread()


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    """Record into `recorder` while the block runs (one recorder at a time)."""
    global _active
    if _active is not None:
        raise RuntimeError("a Recorder is already active")
    _active = recorder
    try:
        yield recorder
    finally:
        _active = None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as phase `name` (exclusive of phases opened inside it). Worker threads are not timed here: they
    report with `background`."""
    rec = _active
    if rec is None or threading.current_thread() is not _main_thread:
        yield
        return
    _sync()
    entry = [name, time.perf_counter(), 0.0]
    rec.stack.append(entry)
    try:
        yield
    finally:
        _sync()
        rec.stack.pop()
        total = time.perf_counter() - entry[1]
        rec.seconds[name] += total - entry[2]
        rec.calls[name] += 1
        if rec.stack:
            rec.stack[-1][2] += total


def count_forward(samples: int, grad: bool) -> None:
    """`samples` went through a model forward in the current phase (grad: with autograd, a backward follows)."""
    rec = _active
    if rec is None:
        return
    with rec.lock:
        name = rec.current() if threading.current_thread() is _main_thread else "background"
        rec.forwards[name] += samples
        if grad:
            rec.grad_forwards[name] += samples


def background(name: str, seconds: float) -> None:
    """Work done off the main thread (the reward scorer): its seconds, to compare with what the main thread waited."""
    rec = _active
    if rec is not None:
        with rec.lock:
            rec.background[name] += seconds
