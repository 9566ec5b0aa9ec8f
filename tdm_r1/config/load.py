"""A strict YAML loader for the schema of `tdm_r1.config.schema`.

YAML holds values only; the dataclasses are the schema. Unknown keys and wrong types are errors that
name the dotted key. `--set a.b=value` overrides are parsed as YAML scalars. Keys of earlier versions are migrated.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from tdm_r1.config.schema import Config, ConfigError

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # PyYAML reads exponents without a dot ("1e-3") as strings
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
    if cls is Config:
        data = migrate(data)
    return _build(cls, data)


# Keys of earlier versions, so that stored configs (training states, a run's config.yaml) and older YAML still load.
RENAMED = {("eval", "n_train"): ("eval", "train_subset")}
REMOVED = {("sample", "eta"): "it never had an effect; stochastic rollouts are train.eta"}
_OLD_OCR_DEFAULTS = {"upscale": 3, "pad": 16, "tile_columns": 4, "tile_rows": 16, "threads": 0}


def migrate(data: dict) -> dict:
    """A config mapping in today's keys: renamed keys moved (with a warning), removed ones dropped, and the former
    `reward:` section (the OCR reward's settings) moved into the options of the `ocr` entries of train.rewards."""
    import logging

    log = logging.getLogger(__name__)
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for (sec, old), (new_sec, new) in RENAMED.items():
        if isinstance(data.get(sec), dict) and old in data[sec]:
            log.warning("config key %s.%s is now %s.%s", sec, old, new_sec, new)
            data.setdefault(new_sec, {}).setdefault(new, data[sec].pop(old))
    for (sec, old), why in REMOVED.items():
        if isinstance(data.get(sec), dict) and old in data[sec]:
            log.warning("config key %s.%s was removed: %s", sec, old, why)
            data[sec].pop(old)
    if isinstance(data.get("reward"), dict):
        options = {k: v for k, v in data.pop("reward").items() if k != "name" and _OLD_OCR_DEFAULTS.get(k) != v}
        train = data.setdefault("train", {})
        terms = train.get("rewards", [{"name": "ocr"}]) if isinstance(train, dict) else None
        if options and isinstance(terms, list):
            log.warning("config section reward: is now the options of the ocr entry of train.rewards")
            train["rewards"] = [
                {**t, "options": {**options, **t.get("options", {})}}
                if isinstance(t, dict) and t.get("name", "ocr") == "ocr"
                else t
                for t in terms
            ]
    return data


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
