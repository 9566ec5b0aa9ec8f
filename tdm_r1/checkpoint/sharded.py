"""The training state of a distributed run: a directory with DeepSpeed's checkpoint of each role engine (optimizer
states, fp32 master weights) and one safetensors file per rank with its values of every role tensor, the RNG streams
and the data position (`tdm_r1.checkpoint.read_sharded_roles` stitches the roles back together without DeepSpeed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tdm_r1 import checkpoint as ckpt
from tdm_r1.distributed import Dist, load_local, local_state
from tdm_r1.distributed.engines import RoleEngine
from tdm_r1.roles import Roles


def _unique_engines(engines: dict[str, RoleEngine]) -> dict[str, RoleEngine]:
    """{directory name: engine}: the roles' own names, or "lora" for the engine they share."""
    shared = len({id(e) for e in engines.values()}) == 1 and len(engines) > 1
    return {"lora": next(iter(engines.values()))} if shared else dict(engines)


def save_sharded_state(
    path: Path, dist: Dist, roles: Roles, engines: dict[str, RoleEngine], state: dict, info: dict
) -> Path:
    """Collective. A training state as a directory: DeepSpeed's checkpoint of each engine (optimizer states, fp32
    master weights: engines/<role>/) and one safetensors file per rank with its values of every role tensor, the
    RNG streams and data position. Written under a temporary name, renamed by rank 0 once every rank is done."""

    tmp = path.with_name(path.name + ".tmp")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    for name, engine in _unique_engines(engines).items():
        engine.engine.save_checkpoint(
            str(tmp / "engines" / name), tag="state", save_latest=False, exclude_frozen_parameters=True
        )
    params = roles.state_params()
    shapes = {k: list(getattr(p, "ds_shape", p.shape)) for k, p in params.items()}
    info = info | {"world_size": dist.world, "zero_stage": dist.zero_stage, "rank": dist.rank, "shapes": shapes}
    ckpt.save_train_state(ckpt.rank_file(tmp, dist.rank), state | {"roles": local_state(params, dist)}, info)
    dist.barrier()
    if dist.is_main:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()
    return path


def load_sharded_state(path: Path, dist: Dist, roles: Roles, engines: dict[str, RoleEngine]) -> tuple[dict, dict]:
    """Collective inverse of save_sharded_state on the same number of ranks: restores engines and role tensors; returns
    this rank's (state, info) for the caller's checks and progress."""
    state, info = ckpt.read_train_state(ckpt.rank_file(path, dist.rank))
    if (info.get("world_size"), info.get("zero_stage")) != (dist.world, dist.zero_stage):
        raise ckpt.CheckpointError(
            f"{path} was written by {info.get('world_size')} ranks at ZeRO stage {info.get('zero_stage')}; this run "
            f"has {dist.world} ranks at stage {dist.zero_stage} (resume with the same launch, or `tdm-r1 export` it)"
        )
    for name, engine in _unique_engines(engines).items():
        engine.engine.load_checkpoint(
            str(path / "engines" / name), tag="state", load_module_strict=False, load_lr_scheduler_states=False
        )
    tensors = state["roles"] if dist.zero_stage == 3 else ckpt.read_train_state(ckpt.rank_file(path, 0))[0]["roles"]
    params = roles.state_params()
    if set(tensors) != set(params):
        raise ckpt.CheckpointError(f"{path}: its role tensors do not match this run's roles")
    load_local(params, tensors)
    return state, info
