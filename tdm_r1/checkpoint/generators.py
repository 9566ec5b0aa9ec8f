"""What `tdm-r1 eval` and `tdm-r1 sample` sample from, toy and diffusers models alike.

A source is one of
- a toy model checkpoint (`*.safetensors` written by pretrain / distill / train / export);
- a training state (`state_*.safetensors`, or a distributed run's `state_*.shards` directory): one role of it (the
  EMA generator by default), in lora mode merged into the teacher the run trained against;
- a run directory: its newest training state;
- a diffusers pipeline folder: one `tdm-r1 export` (or a run's pipeline/, student_pipeline/) wrote, whose
  tdm_r1_export.json gives the few-step sampler, or any local SD3 / Z-Image folder (e.g. the teacher itself).

The config a source is sampled and scored under is, from the bottom up: the source's own (the run's config for a
state; the checkpoint's world for a toy checkpoint; model.kind and diffusers.path for a folder), then --config, then
--set. A diffusers folder is always loaded from its own path, whatever the config says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tdm_r1 import checkpoint as ckpt
from tdm_r1.checkpoint.pipeline import PIPELINE_KINDS as PIPELINES
from tdm_r1.config import Config, ConfigError, from_dict, is_diffusers, load_config, to_dict


@dataclass
class Source:
    """A resolved source, before its model is built."""

    path: Path
    kind: str  # "model" (toy checkpoint) | "state" | "pretrain" (a teacher's training state) | "folder" (diffusers)
    base: dict  # the config this source brings (under --config and --set)
    label: str  # how reports name it
    sampler: dict = field(default_factory=dict)  # its own sampler defaults: nfe, cfg, shift, solver (few-step models)
    info: dict = field(default_factory=dict)
    roles: tuple | None = None  # a state's (role tensors, info), read while resolving it


@dataclass
class Generator:
    model: torch.nn.Module
    cfg: Config
    source: Source


def _file_format(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError) as e:
        raise ckpt.CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def _few_step(cfg: Config) -> dict:
    return {"nfe": cfg.tdm.steps, "cfg": 1.0, "shift": cfg.tdm.shift, "solver": "euler"}


def resolve_source(path: str | Path, role: str = "generator_ema") -> Source:
    """What `path` is (module notes); an error names what it expected."""
    p = Path(path)
    if not p.exists():
        raise ckpt.CheckpointError(f"--checkpoint {p}: no such file or folder")
    if p.is_dir() and (p / "model_index.json").is_file():
        return _folder_source(p)
    if p.is_dir() and not ckpt.is_sharded(p):
        states = ckpt.list_train_states(p)
        if not states:
            raise ckpt.CheckpointError(
                f"{p} is neither a diffusers pipeline folder (no model_index.json) nor a run directory with training "
                f"states (nothing under {p / 'checkpoints'}); give a model checkpoint, a state or an exported folder"
            )
        p = states[-1]
    if p.is_dir() or _file_format(p) == ckpt.STATE_FORMAT:
        from tdm_r1.checkpoint.export import read_role_tensors

        if p.is_file():
            state, info = ckpt.read_train_state(p)
            if info.get("command") == "pretrain":  # a teacher's training state: its EMA (or online) weights
                weights = {"generator_ema": state["ema"], "generator": state["model"]}
                label = f"{p.name} (pretrain {'EMA' if role == 'generator_ema' else role}, step {info.get('step')})"
                return Source(p, "pretrain", info["config"], label, {}, info, (weights, info))
            if "roles" not in state:
                raise ckpt.CheckpointError(f"{p}: a training state without roles (command {info.get('command')!r})")
            roles = (state["roles"], info)
        else:
            roles = read_role_tensors(p)
        info = roles[1]
        if "config" not in info:
            raise ckpt.CheckpointError(f"{p}: the training state holds no run config")
        cfg = from_dict(info["config"])
        step = info.get("epoch", info.get("step"))
        label = f"{p.name} ({role}, step {step})"
        return Source(p, "state", info["config"], label, _few_step(cfg), info, roles)
    fmt = _file_format(p)
    if fmt != ckpt.MODEL_FORMAT:
        raise ckpt.CheckpointError(
            f"{p} is not a tdm-r1 model checkpoint or training state (format {fmt!r}); an adapter file "
            "(*_adapter.safetensors) is loaded through roles.generator_init, not sampled on its own"
        )
    _, model_cfg, world_cfg, info = ckpt.read_model(p)
    if model_cfg.kind != "tiny_dit":
        raise ckpt.CheckpointError(f"{p}: model.kind {model_cfg.kind!r}; a diffusers model is sampled from a folder")
    return Source(p, "model", {"world": to_dict(world_cfg)}, p.name, {}, info)


def _folder_source(p: Path) -> Source:
    from tdm_r1.checkpoint.pipeline import EXPORT_INFO

    index = json.loads((p / "model_index.json").read_text())
    kind = PIPELINES.get(index.get("_class_name", ""))
    if kind is None:
        raise ckpt.CheckpointError(
            f"{p}: a {index.get('_class_name')!r} pipeline; tdm-r1 samples {', '.join(PIPELINES)} folders"
        )
    info = json.loads((p / EXPORT_INFO).read_text()) if (p / EXPORT_INFO).is_file() else {}
    sampler = {}
    if info:
        call = info["pipeline_call"]
        sampler = {"nfe": call["num_inference_steps"], "cfg": 1.0, "shift": info["shift"], "solver": "euler"}
    base = {"model": {"kind": kind}, "diffusers": {"path": str(p)}}
    return Source(p, "folder", base, p.name, sampler, info)


def source_config(source: Source, config: str | None, overrides: list[str]) -> Config:
    """The config `source` is sampled under (module notes)."""
    cfg = load_config(config, overrides, base=source.base)
    if source.kind == "folder":  # the folder is the model, whatever a --config names
        cfg = replace(cfg, model=replace(cfg.model, kind=source.base["model"]["kind"]))
        cfg = replace(cfg, diffusers=replace(cfg.diffusers, path=str(source.path), random_init=False))
    return cfg


def load_generator(source: Source, cfg: Config, role: str = "generator_ema", device: torch.device | None = None):
    """The model `source` describes, in eval mode on `device` (default CPU)."""
    if source.kind == "model":
        model = ckpt.load_model(source.path)[0]
    elif source.kind == "pretrain":
        from tdm_r1.models.tiny_dit import build_tiny_dit

        weights, info = source.roles
        if role not in weights:
            raise ckpt.CheckpointError(f"{source.path} is a pretrain state: --role generator_ema (EMA) or generator")
        run_cfg: Config = from_dict(info["config"])
        model = build_tiny_dit(run_cfg.model, run_cfg.world)
        model.load_state_dict(weights[role], strict=True)
    elif source.kind == "folder":
        model = _folder_model(source, cfg)
    else:
        model = _state_model(source, cfg, role)
    return model.eval().requires_grad_(False).to(device or torch.device("cpu"))


def _folder_model(source: Source, cfg: Config):
    from safetensors.torch import load_file

    from tdm_r1.checkpoint.pipeline import LORA_FILE, merge_lora_into, split_lora
    from tdm_r1.models.load import load_diffusers_model

    model = load_diffusers_model(cfg.model, cfg.diffusers)
    if source.info.get("lora") == LORA_FILE:  # exported with --lora adapter: the adapter beside the base transformer
        merge_lora_into(model.transformer, split_lora(load_file(source.path / LORA_FILE)), source.info["lora_alpha"])
    return model


def _state_model(source: Source, cfg: Config, role: str):
    from tdm_r1.checkpoint.export import _merged, read_role_tensors
    from tdm_r1.checkpoint.sources import file_sha256, folder_fingerprint, load_teacher

    tensors, info = source.roles if source.roles is not None else read_role_tensors(source.path)
    source.roles = None  # read once: a state's tensors are not kept beside the model built from them
    prefix = f"{role}/"
    own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not own:
        have = sorted({k.split("/")[0] for k in tensors})
        raise ckpt.CheckpointError(f"{source.path} has no role {role!r}; it has {', '.join(have)}")
    run_cfg: Config = from_dict(info["config"])  # the model is the run's, whatever --config says
    adapter = {k.replace(f".{role}.", "."): v for k, v in own.items()}
    if not is_diffusers(run_cfg):
        if run_cfg.roles.mode == "full":
            weights = own
        else:
            if file_sha256(run_cfg.roles.teacher) != info.get("teacher_sha256"):
                raise ckpt.CheckpointError(
                    f"{source.path} was trained against a different teacher than {run_cfg.roles.teacher}"
                )
            with torch.no_grad():
                weights = _merged(run_cfg.roles, load_teacher(run_cfg), adapter)
        from tdm_r1.models.tiny_dit import build_tiny_dit

        model = build_tiny_dit(run_cfg.model, run_cfg.world)
        model.load_state_dict(weights, strict=True)
        return model
    from tdm_r1.checkpoint.pipeline import merge_lora_into, split_lora
    from tdm_r1.models.load import load_diffusers_model

    if folder_fingerprint(run_cfg.diffusers.path) != info.get("teacher_sha256"):
        raise ckpt.CheckpointError(
            f"{source.path} was trained against another model than the one now at "
            f"diffusers.path={run_cfg.diffusers.path!r}"
        )
    model = load_diffusers_model(run_cfg.model, replace(cfg.diffusers, path=run_cfg.diffusers.path))
    with torch.no_grad():
        if run_cfg.roles.mode == "lora":
            merge_lora_into(model.transformer, split_lora(adapter), run_cfg.roles.lora_alpha)
        else:
            state = model.state_dict()
            missing = sorted(set(own) - set(state))
            if missing:
                raise ckpt.CheckpointError(f"{source.path}: role tensors the model does not have: {missing[:4]}")
            model.load_state_dict(state | {k: v.to(state[k].dtype) for k, v in own.items()}, strict=True)
    return model


def check_role(source: Source, role: str) -> None:
    if role != "generator_ema" and source.kind not in ("state", "pretrain"):
        raise ConfigError(f"--role {role}: only a training state or run directory holds several roles ({source.path})")
