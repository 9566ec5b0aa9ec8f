"""Checkpoints: atomic safetensors files whose metadata carries the config needed to rebuild the model.

Writes go to a temporary file in the same directory, are fsynced, then renamed over the target, so a
crash never leaves a half-written checkpoint under the final name and the previous one survives.
`tdm_r1.checkpoint.resume` continues a run from its training state exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tdm_r1.config import ModelConfig, WorldConfig, from_dict, to_dict

MODEL_FORMAT = "tdm_r1.model/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or not one of ours."""


class CorruptStateError(CheckpointError):
    """A training state cannot be read back as written: truncated, foreign, or its checksum does not match."""


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def atomic_write(path: str | Path, write_fn) -> None:
    """Call write_fn(tmp_path), fsync it, and rename onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_model(
    path: str | Path, state: dict[str, torch.Tensor], model_cfg: ModelConfig, world_cfg: WorldConfig, **info
) -> None:
    """Save model weights with the model and world config in the safetensors metadata."""
    meta = {
        "format": MODEL_FORMAT,
        "model": json.dumps(to_dict(model_cfg)),
        "world": json.dumps(to_dict(world_cfg)),
        "info": json.dumps(info),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_tagged(
    path: str | Path, fmt: str, what: str, hint: str = "", error: type[CheckpointError] = CheckpointError
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file of ours written as `fmt`: a missing file is a CheckpointError, a
    foreign or unreadable one (truncated, corrupt) an `error`, each naming the file and `what` it should be."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{what} not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != fmt:
                raise error(f"{p} is not a tdm-r1 {what} (format {meta.get('format')!r}, expected {fmt!r}){hint}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise error(f"{p} is not a readable {what} (truncated or corrupt?): {e}") from e
    return tensors, meta


def read_model(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, WorldConfig, dict]:
    """Load a model checkpoint; refuse truncated or foreign files with a clear error."""
    state, meta = read_tagged(path, MODEL_FORMAT, "model checkpoint")
    model_cfg = from_dict(json.loads(meta["model"]), ModelConfig)
    world_cfg = from_dict(json.loads(meta["world"]), WorldConfig)
    return state, model_cfg, world_cfg, json.loads(meta.get("info", "{}"))


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint describes and load its weights. Returns (model, world_cfg, info)."""
    from tdm_r1.models.tiny_dit import build_tiny_dit

    state, model_cfg, world_cfg, info = read_model(path)
    if model_cfg.kind != "tiny_dit":
        raise CheckpointError(
            f"{path}: its metadata says model.kind {model_cfg.kind!r}; a tdm-r1 model checkpoint holds the toy model "
            "(a diffusers run exports a pipeline folder)"
        )
    model = build_tiny_dit(model_cfg, world_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.to(device).eval(), world_cfg, info


# -- training state ---------------------------------------------------------------------------------
# One safetensors file per checkpoint: every tensor (role weights, optimizer moments, RNG states) is a
# safetensors entry; the nesting and the small non-tensor values (step, data position, optimizer
# hyper-parameters, numpy / python RNG states) are a JSON skeleton in the metadata. Nothing is pickled.

STATE_FORMAT = "tdm_r1.train_state/1"
STATE_GLOB = "state_*.safetensors"


def _flatten(obj, key: str, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [_flatten(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state at {key!r}: cannot store a {type(obj).__name__}")


def _unflatten(node, tensors: dict[str, torch.Tensor]):
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__dict__" in node:
            return {k: _unflatten(v, tensors) for k, v in node["__dict__"]}
        if "__tuple__" in node:
            return tuple(_unflatten(v, tensors) for v in node["__tuple__"])
        if "__list__" in node:
            return [_unflatten(v, tensors) for v in node["__list__"]]
        raise CheckpointError(f"training state: unknown node {sorted(node)}")
    return node


def save_train_state(path: str | Path, state: dict, info: dict | None = None) -> None:
    """Atomically write a nested dict of tensors / JSON values (see module notes)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    meta = {"format": STATE_FORMAT, "state": json.dumps(skeleton), "info": json.dumps(info or {})}
    meta["sha256"] = tensors_sha256(tensors)  # verified on every read: a flipped bit is refused, not trained on
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_train_state(path: str | Path) -> tuple[dict, dict]:
    """Inverse of save_train_state -> (state, info); refuses truncated, foreign or altered files (CorruptStateError)."""
    tensors, meta = read_tagged(path, STATE_FORMAT, "training-state checkpoint", error=CorruptStateError)
    p = Path(path)
    try:
        skeleton = json.loads(meta["state"])
        info = json.loads(meta.get("info", "{}"))
    except (json.JSONDecodeError, KeyError) as e:
        raise CorruptStateError(f"{p} is not a readable training-state checkpoint (its skeleton: {e})") from e
    if "sha256" in meta and tensors_sha256(tensors) != meta["sha256"]:  # states written before checksums have none
        raise CorruptStateError(f"{p}: its tensors do not match the checksum written with them (the file was altered)")
    return _unflatten(skeleton, tensors), info


def state_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"state_{step:06d}.safetensors"


# A distributed run (tdm_r1.checkpoint.sharded) writes a directory per training state: one safetensors
# file per rank (the same format as above, its ZeRO-3 partitions of the role tensors) and DeepSpeed's engine
# checkpoints.
SHARDED_GLOB = "state_*.shards"


def sharded_state_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"state_{step:06d}.shards"


def rank_file(state_dir: str | Path, rank: int) -> Path:
    return Path(state_dir) / f"rank_{rank:05d}.safetensors"


def is_sharded(path: str | Path) -> bool:
    return Path(path).suffix == ".shards"


def list_train_states(run_dir: str | Path) -> list[Path]:
    """Training-state checkpoints of a run (files, or directories of a distributed run), oldest first."""
    d = Path(run_dir) / "checkpoints"
    return sorted([*d.glob(STATE_GLOB), *(p for p in d.glob(SHARDED_GLOB) if p.is_dir())], key=lambda p: p.name)


def prune_train_states(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` training-state checkpoints (keep <= 0 keeps all)."""
    import shutil

    if keep > 0:
        for p in list_train_states(run_dir)[:-keep]:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def read_sharded_roles(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Whole role tensors of a distributed training state (ZeRO-3 partitions of every rank stitched together, no
    DeepSpeed needed) and rank 0's info."""
    path = Path(path)
    state, info = read_train_state(rank_file(path, 0))
    if info.get("zero_stage") != 3:
        return state["roles"], info
    parts = [state["roles"]] + [read_train_state(rank_file(path, r))[0]["roles"] for r in range(1, info["world_size"])]
    out = {}
    for key, shape in info["shapes"].items():
        numel = int(torch.Size(shape).numel())
        out[key] = torch.cat([p[key].flatten() for p in parts])[:numel].view(shape)
    return out, info


def rng_state(torch_generators: dict[str, torch.Generator], numpy_rngs: dict) -> dict:
    """Snapshot of the global torch / numpy / python RNGs and of the named generators."""
    import random

    import numpy as np

    return {
        "torch": torch.get_rng_state(),
        "numpy_global": list(_np_global_state(np)),
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in torch_generators.items()},
        "numpy": {k: r.bit_generator.state for k, r in numpy_rngs.items()},
    }


def _np_global_state(np):
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss


def set_rng_state(state: dict, torch_generators: dict[str, torch.Generator], numpy_rngs: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy_global"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    for k, g in torch_generators.items():
        g.set_state(state["generators"][k])
    for k, r in numpy_rngs.items():
        r.bit_generator.state = state["numpy"][k]


# -- lora adapters ----------------------------------------------------------------------------------

ADAPTER_FORMAT = "tdm_r1.adapter/1"


def save_adapter(path: str | Path, tensors: dict[str, torch.Tensor], cfg, **info) -> None:
    """One role's lora tensors (keys without the adapter name) with the lora settings and model config."""
    r = cfg.roles
    meta = {
        "format": ADAPTER_FORMAT,
        "lora": json.dumps({"rank": r.lora_rank, "alpha": r.lora_alpha, "targets": r.lora_targets}),
        "model": json.dumps(to_dict(cfg.model)),
        "world": json.dumps(to_dict(cfg.world)),
        "info": json.dumps(info),
    }
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=meta))


def read_adapter(path: str | Path, roles_cfg) -> dict[str, torch.Tensor]:
    """Adapter tensors written by save_adapter; refuses foreign files and mismatched lora settings."""
    hint = "; roles.mode=lora starts the generator from student_adapter.safetensors, roles.mode=full from a model"
    tensors, meta = read_tagged(path, ADAPTER_FORMAT, "adapter", hint)
    p = Path(path)
    lora = json.loads(meta["lora"])
    want = {"rank": roles_cfg.lora_rank, "alpha": roles_cfg.lora_alpha, "targets": roles_cfg.lora_targets}
    if lora != want:
        raise CheckpointError(f"{p}: adapter lora settings {lora} differ from roles.lora_* {want}")
    return tensors
