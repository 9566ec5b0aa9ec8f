"""Config schema (dataclass tree) and a strict YAML loader.

YAML holds values only; the dataclasses are the schema. Unknown keys and wrong types are errors that
name the dotted key. `--set a.b=value` overrides are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the dotted key."""


@dataclass
class WorldConfig:
    name: Literal["ocr"] = "ocr"
    height: int = 16
    width: int = 64
    channels: Literal[1, 3] = 1
    # Word lists, one uppercase word per line; relative paths resolve against the working directory.
    train_words: str = "configs/words/ocr_train.txt"
    heldout_words: str = "configs/words/ocr_heldout.txt"
    alphabet: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    max_word_len: int = 8
    prompt_template: str = 'a sign that says "{word}"'
    # Difficulty knobs. Levels are in [0, 1] (0 black, 1 white).
    font_sizes: list[int] = field(default_factory=lambda: [12])
    background_level: list[float] = field(default_factory=lambda: [0.85, 0.85])
    text_level: list[float] = field(default_factory=lambda: [0.1, 0.1])
    random_rgb: bool = False  # random text/background colours (needs channels: 3)
    invert_prob: float = 0.0  # probability of light text on a dark background
    left_margin: int = 2
    jitter_x: int = 0  # uniform horizontal offset in [0, jitter_x] pixels
    jitter_y: int = 0  # uniform vertical offset in [-jitter_y, jitter_y] pixels
    noise_std: float = 0.0  # Gaussian pixel noise, in [0, 1] units


@dataclass
class ModelConfig:
    kind: Literal["tiny_dit"] = "tiny_dit"
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    patch: int = 4
    text_len: int = 32  # characters of the prompt kept (longer prompts are an error)
    text_layers: int = 2


@dataclass
class PretrainConfig:
    steps: int = 2500
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    cond_drop_prob: float = 0.1  # prompt dropout, enables CFG
    logit_normal_std: float = 1.0  # s ~ sigmoid(N(0, std)), as in SD3
    log_every: int = 50
    save_every: int = 250  # intermediate checkpoints (EMA weights) under <run_dir>/checkpoints


@dataclass
class SampleConfig:
    shift: float = 3.0  # shift(u) = k u / (1 + (k - 1) u)
    nfe: int = 32
    cfg: float = 3.0
    solver: Literal["euler", "dpmpp2m"] = "euler"
    eta: float = 0.0  # stochastic re-noising; ablation only


@dataclass
class RewardConfig:
    name: Literal["ocr"] = "ocr"
    upscale: int = 3  # integer upscaling before OCR
    pad: int = 16  # white margin around each image, in upscaled pixels
    tile_columns: int = 4  # images per canvas row when tiling
    tile_rows: int = 16  # canvas rows; one OCR call per tile_columns * tile_rows images
    threads: int = 0  # onnxruntime intra-op threads; 0 = library default


@dataclass
class EvalConfig:
    n_train: int = 256  # train-split words evaluated (a fixed, seeded subset)
    batch_size: int = 128
    seed: int = 1234
    grid_rows: int = 8
    grid_cols: int = 8


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed or type(value) is not type(allowed[0]):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported schema type {tp!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, cls: type = Config) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config root must be a mapping, got {type(data).__name__}")
    return _build(cls, data)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
    return key, value


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, cls: type = Config, base: dict | None = None
) -> Any:
    """Load YAML at `path` (or defaults when None) on top of `base`, apply `key=value` overrides,
    validate strictly."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {p}: top level must be a mapping")
            data = loaded
    data = _deep_merge(base or {}, data)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return from_dict(data, cls)


def save_config(cfg: Any, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
