"""Arguments and config loading that several commands take."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from tdm_r1.config import Config, ConfigError, is_diffusers, load_config, to_dict


def add_config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", required=required, help="YAML config (see configs/)")
    add_set_arg(p, "override a config value by dotted key, e.g. --set pretrain.steps=100 (repeatable)")


def add_set_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    """--set KEY=VALUE, repeatable, collected in args.overrides."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def add_server_args(p: argparse.ArgumentParser, port: int, requests: str) -> None:
    """What every HTTP server command takes: where it binds, and the limits tests stop it by."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=port, help="port (0: any free one, printed)")
    p.add_argument("--max-requests", type=int, default=0, help=f"stop after answering this many {requests} (0: never)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop after this long (0: never)")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")


def run_server(args: argparse.Namespace, command: str, app, stop_event, announce) -> None:
    """Serve `app` as add_server_args say: a warning when reachable from other machines; once listening,
    `announce(port)` and the port file; until stopped (tdm_r1.serving.serve)."""
    import asyncio
    import logging

    from tdm_r1.serving import is_loopback, serve

    if not is_loopback(args.host):
        logging.getLogger(f"tdm_r1.commands.{command}").warning(
            "%s: binding %s, reachable from other machines; put TLS in front of it", command, args.host
        )

    def ready(port: int) -> None:
        announce(port)
        if args.port_file:
            Path(args.port_file).write_text(str(port))

    asyncio.run(serve(app, stop_event, args.host, args.port, args.max_seconds, ready))


def add_resume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="continue from a training-state checkpoint (default: the newest one under run_dir/checkpoints)",
    )


def setup_threads(cfg: Config) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def config_from_teacher(args: argparse.Namespace) -> Config:
    """The teacher checkpoint's model and world are the defaults; the YAML and --set override them. A diffusers model
    (model.kind sd3 / zimage) has no teacher checkpoint: its config is the YAML and --set alone."""
    from tdm_r1.checkpoint import read_model

    first = load_config(args.config, args.overrides)
    if is_diffusers(first):
        return first
    _, model_cfg, world_cfg, _ = read_model(first.roles.teacher)
    return load_config(args.config, args.overrides, base={"model": to_dict(model_cfg), "world": to_dict(world_cfg)})


# -- eval / sample: a model checkpoint and the sampler settings ------------------------------------------------


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="what to sample: a toy model checkpoint (.safetensors), a training state (state_*.safetensors or "
        "state_*.shards), a run directory (its newest state), or a diffusers pipeline folder (`tdm-r1 export`, a "
        "run's pipeline/, or the SD3 / Z-Image model itself)",
    )
    p.add_argument(
        "--role", default="generator_ema", help="the role of a training state or run to sample (default: EMA generator)"
    )
    add_config_args(p, required=False)
    p.add_argument("--nfe", type=int, default=None, help="sampler steps (default: the model's own, else sample.nfe)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale; 1 disables CFG (default: as --nfe)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift k (default: as --nfe)")
    p.add_argument("--solver", choices=["euler", "dpmpp2m"], default=None, help="default: as --nfe")


def sampling_settings(args: argparse.Namespace, cfg: Config, own: dict | None = None) -> tuple[int, float, float, str]:
    """(nfe, CFG scale, shift, solver): the command line's, else the model's own (a few-step generator from a state or
    an exported folder: tdm.steps, no CFG, tdm.shift, Euler), else the config's `sample:` section."""
    s, own = cfg.sample, own or {}
    defaults = {"nfe": s.nfe, "cfg": s.cfg, "shift": s.shift, "solver": s.solver} | own
    pick = lambda name: defaults[name] if getattr(args, name) is None else getattr(args, name)
    return pick("nfe"), pick("cfg"), pick("shift"), pick("solver")


@dataclass
class Loadable:
    """A resolved source whose model is built on demand (one model in memory at a time)."""

    source: object
    cfg: Config
    role: str
    device: torch.device

    def load(self):
        from tdm_r1.checkpoint.generators import load_generator

        return load_generator(self.source, self.cfg, self.role, self.device)


def load_sources(args: argparse.Namespace, given: list[tuple[str | None, str]]):
    """([Loadable per given (path, role), skipping None paths], the config of the first, Dist). Every source must
    make images of the first one's size; the process joins a `deepspeed` launch and models go to this rank's device."""
    from tdm_r1 import distributed
    from tdm_r1.checkpoint.generators import check_role, resolve_source, source_config

    out = []
    for path, role in given:
        if path is None:
            continue
        source = resolve_source(path, role)
        check_role(source, role)
        out.append((source, role, source_config(source, args.config, args.overrides)))
    cfg = out[0][2]
    setup_threads(cfg)
    size = lambda c: (c.diffusers.height, c.diffusers.width) if is_diffusers(c) else (c.world.height, c.world.width)
    for source, _, c in out[1:]:
        if is_diffusers(c) != is_diffusers(cfg) or size(c) != size(cfg):
            raise ConfigError(
                f"--against {source.path}: makes {c.model.kind} images of {size(c)}, the model compared makes "
                f"{cfg.model.kind} images of {size(cfg)}"
            )
    dist = distributed.init(cfg.distributed, cfg.optim)
    device = distributed.rank_device()
    return [Loadable(s, c, role, device) for s, role, c in out], cfg, dist


def eval_world(cfg: Config, need_splits: bool):
    """The world items are drawn from and scored in. need_splits False (the items come from the command line or a
    file): the OCR world's word lists and a diffusers config's prompt files are not read, so the command works from
    any directory (another toy world is built whole)."""
    from tdm_r1.worlds import build_world
    from tdm_r1.worlds.ocr import OCRWorld
    from tdm_r1.worlds.prompts import PromptWorld

    if is_diffusers(cfg):
        if need_splits:
            from tdm_r1.run import build_world as build_run_world

            return build_run_world(cfg)
        return PromptWorld([], [], cfg.diffusers.height, cfg.diffusers.width)
    if not need_splits and cfg.world.name == "ocr":
        return OCRWorld(cfg.world, [], [])
    return build_world(cfg.world)


def writable_output(path: str | Path) -> Path:
    """`path`'s folder created and checked writable now, before the work whose result goes there."""
    import tempfile

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e} (choose another --out)") from e
    return path


def read_prompt_items(path: str, world) -> list[str]:
    """The items of a file, one per line: the world's own reader (`read_items`) where it has one, else words of the
    OCR world's alphabet."""
    if hasattr(world, "read_items"):
        return world.read_items(path)
    from tdm_r1.worlds.ocr import read_words

    return read_words(path, world.cfg.alphabet, world.cfg.max_word_len)
