"""Export a trained generator into a diffusers pipeline folder that `DiffusionPipeline.from_pretrained` loads.

The folder is the source folder with three things changed: the transformer (the generator's weights, LoRA merged
into them), or the original transformer plus `pytorch_lora_weights.safetensors` (for `pipe.load_lora_weights`);
the scheduler config (shift = the student's, no dynamic shifting); and `tdm_r1_export.json`, which records the
pipeline call that reproduces the few-step sampler (`sigmas` are the pre-shift points u = 1, (K-1)/K, ..., 1/K,
which the scheduler shifts; no CFG).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tdm_r1.models.diffusers_common import DiffusersFlowModel

EXPORT_INFO = "tdm_r1_export.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_PREFIXES = ("base_model.model.", "transformer.")


@dataclass
class FolderRef:
    """What an export needs of the source model without loading it: the folder, the model kind, the compute dtype, the
    pipeline class (LoRA saving) and the scheduler (`folder_ref`). A loaded DiffusersFlowModel serves as well."""

    source: Path
    kind: str
    compute_dtype: torch.dtype
    pipeline_cls: type
    scheduler: object


PIPELINE_KINDS = {"StableDiffusion3Pipeline": "sd3", "ZImagePipeline": "zimage"}


def folder_ref(path: str | Path, dtype: torch.dtype) -> FolderRef:
    """The FolderRef of a local SD3 / Z-Image diffusers folder, from its configs alone (no weights read)."""
    import diffusers

    root = Path(path)
    index = json.loads((root / "model_index.json").read_text())
    name = index.get("_class_name", "")
    if name not in PIPELINE_KINDS:
        raise ValueError(f"{root}: a {name!r} pipeline; expected one of {', '.join(PIPELINE_KINDS)}")
    sched_cls = getattr(diffusers, index["scheduler"][1])
    scheduler = sched_cls.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    return FolderRef(root, PIPELINE_KINDS[name], dtype, getattr(diffusers, name), scheduler)


def transformer_parameter_names(source: str | Path) -> set[str]:
    """The parameter names of a folder's transformer, from its config on the meta device (no weights read)."""
    import diffusers

    config = json.loads((Path(source) / "transformer" / "config.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(source, subfolder="transformer", local_files_only=True))
    return {n for n, _ in model.named_parameters()}


def _pipeline_cls(adapter) -> type:
    return adapter.pipeline_cls if isinstance(adapter, FolderRef) else type(adapter.frozen.pipe)


def _scheduler(adapter):
    return adapter.scheduler if isinstance(adapter, FolderRef) else adapter.frozen.pipe.scheduler


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p) :]
    return key


def split_lora(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """LoRA tensors keyed `[transformer.]<module>.lora_A[.<adapter>].weight` (Roles.adapter_tensors, peft state
    dicts) -> {module inside the transformer: (A [r, in], B [out, r])}."""
    parts: dict[str, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        m = _LORA_KEY.match(_strip(k))
        if m is None:
            raise KeyError(f"{k!r} is not a LoRA weight (expected <module>.lora_A.weight / <module>.lora_B.weight)")
        parts.setdefault(m["module"], {})[m["ab"]] = v
    incomplete = sorted(mod for mod, ab in parts.items() if set(ab) != {"A", "B"})
    if incomplete:
        raise KeyError(f"LoRA modules without both lora_A and lora_B: {incomplete[:4]}")
    return {mod: (ab["A"], ab["B"]) for mod, ab in parts.items()}


@torch.no_grad()
def merge_lora_into(transformer: torch.nn.Module, lora: dict[str, tuple[Tensor, Tensor]], alpha: float) -> None:
    """W <- W + (alpha / r) B A for every LoRA module, computed in fp32 (peft's scaling without rsLoRA)."""
    for name, (a, b) in lora.items():
        weight = transformer.get_submodule(name).weight
        delta = (alpha / a.shape[0]) * (b.float() @ a.float())
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


def export_diffusers_pipeline(
    adapter: DiffusersFlowModel | FolderRef,
    generator_state_or_lora: dict[str, Tensor],
    out_dir: str | Path,
    merge_lora: bool = True,
    *,
    lora_alpha: float | None = None,
    steps: int = 4,
    shift: float = 3.0,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    link_unchanged: bool = False,
) -> Path:
    """Write a diffusers pipeline folder for the generator.

    adapter: the loaded source model, or its FolderRef (`folder_ref`: nothing loaded).
    generator_state_or_lora: the generator's full transformer state dict (full mode, e.g. Roles.export; keys with or
    without the `transformer.` prefix; a key it lacks, e.g. a buffer, is the source's) or its LoRA tensors (lora
    mode, Roles.adapter_tensors), detected from the keys.
    merge_lora: LoRA merged into the transformer weights, or kept as `pytorch_lora_weights.safetensors` beside the
    unchanged transformer. lora_alpha: required for LoRA tensors (the rank is read from their shapes).
    dtype: weights dtype of the written transformer (default: the adapter's compute dtype).
    link_unchanged: symlink the unchanged components (text encoders, tokenizers, VAE) to the source folder instead
    of copying them (SD3.5-M's text encoders are ~11 GB), for periodic exports on the machine that holds the source.
    The folder is built next to out_dir and renamed into place, so a failed export leaves no half-written folder.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; export into a new folder (or remove it; overwrite=True from Python)"
        )
    is_lora = any("lora_" in k for k in generator_state_or_lora)
    lora = split_lora(generator_state_or_lora) if is_lora else None
    if lora is not None and lora_alpha is None:
        raise ValueError("exporting LoRA tensors needs lora_alpha (roles.lora_alpha)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _copy_frozen(adapter.source, tmp, link_unchanged)
        _write_transformer(adapter, generator_state_or_lora, lora, lora_alpha, merge_lora, tmp, dtype)
        _write_scheduler(adapter, shift, tmp)
        _write_info(adapter, lora, lora_alpha, merge_lora, steps, shift, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _copy_frozen(source: Path, dst: Path, link: bool) -> None:
    """Every component except transformer and scheduler, as is (hidden download caches skipped)."""
    for entry in source.iterdir():
        if entry.name in ("transformer", "scheduler") or entry.name.startswith("."):
            continue
        if link and entry.is_dir():
            (dst / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
        elif entry.is_dir():
            shutil.copytree(entry, dst / entry.name)
        else:
            shutil.copy2(entry, dst / entry.name)


def _write_transformer(adapter, state, lora, alpha, merge_lora, dst: Path, dtype) -> None:
    if lora is not None and not merge_lora:
        shutil.copytree(adapter.source / "transformer", dst / "transformer")
        ranks = {a.shape[0] for a, _ in lora.values()}
        if len(ranks) != 1:
            raise ValueError(f"LoRA modules have different ranks {sorted(ranks)}; keep-adapter export needs one")
        layers = {}
        for name, (a, b) in lora.items():
            layers[f"{name}.lora_A.weight"] = a.detach().cpu().contiguous()
            layers[f"{name}.lora_B.weight"] = b.detach().cpu().contiguous()
        meta = {"r": ranks.pop(), "lora_alpha": alpha, "target_modules": sorted(lora)}
        _pipeline_cls(adapter).save_lora_weights(
            dst, transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta, weight_name=LORA_FILE
        )
        return
    stream_transformer(adapter.source / "transformer", dst / "transformer", dtype or adapter.compute_dtype, lora, alpha,
                       None if lora is not None else {_strip(k): v for k, v in state.items()})  # fmt: skip


WEIGHTS = "diffusion_pytorch_model.safetensors"
SHARD_BYTES = 2 << 30  # bytes of one written transformer shard: the most the export holds besides the role's weights


def _weight_files(src: Path) -> list[Path]:
    """The source transformer's safetensors files in key order (sharded: as its index lists them)."""
    index = src / f"{WEIGHTS}.index.json"
    if index.is_file():
        names = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
        return [src / n for n in names]
    if (src / WEIGHTS).is_file():
        return [src / WEIGHTS]
    raise FileNotFoundError(
        f"{src}: no {WEIGHTS} (or its sharded index); export streams the transformer from safetensors weights"
    )


@torch.no_grad()
def stream_transformer(
    src: Path,
    dst: Path,
    dtype: torch.dtype,
    lora: dict[str, tuple[Tensor, Tensor]] | None = None,
    alpha: float | None = None,
    state: dict[str, Tensor] | None = None,
    shard_bytes: int | None = None,
) -> dict[str, int]:
    """Write the transformer folder `dst` from the source folder `src` tensor by tensor, in `dtype`: each weight is the
    source's (read from its safetensors files one tensor at a time) or `state`'s (full mode: the generator's weights,
    each key it lacks - buffers - is the source's), a LoRA module's weight with (alpha / r) B A added in fp32 (as
    `merge_lora_into`); written
    in shards of about `shard_bytes` (default SHARD_BYTES; diffusers' index layout when more than one). Host memory
    beyond `state`: the shard being built, its serialisation when written, the source pages read since the last shard
    (mapped; the file is reopened after each shard) and one weight in fp32 - never the whole transformer
    (benchmarks/export_memory.py measures it). Returns {"shards", "bytes", "largest_shard"}."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shard_bytes = SHARD_BYTES if shard_bytes is None else shard_bytes
    dst.mkdir(parents=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    deltas = {f"{module}.weight": ab for module, ab in (lora or {}).items()}
    unused = set(state or ())
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, Tensor] = {}
    size = total = largest = 0

    def flush() -> None:
        nonlocal shard, size, largest
        if shard:
            path = dst / f".shard-{len(written):05d}"
            save_file(shard, str(path), metadata={"format": "pt"})
            written.append((path, list(shard)))
            largest = max(largest, size)
        shard, size = {}, 0

    for f in _weight_files(src):
        with safe_open(str(f), framework="pt") as fh:
            keys = deque(fh.keys())
        while keys:
            with safe_open(str(f), framework="pt") as fh:  # reopened after each shard: the pages read are unmapped
                while keys:
                    key = keys.popleft()
                    if state is not None and key in state:
                        t = state[key]
                        unused.discard(key)
                    else:
                        t = fh.get_tensor(key)
                    if key in deltas:
                        a, b = deltas.pop(key)
                        t = t.float() + ((alpha / a.shape[0]) * (b.float() @ a.float())).to(t.device)
                    out = (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()
                    shard[key] = out
                    nbytes = out.numel() * out.element_size()
                    size, total = size + nbytes, total + nbytes
                    if size >= shard_bytes:
                        flush()
                        break
    flush()
    if deltas:
        raise KeyError(f"LoRA modules with no weight in the source transformer: {sorted(deltas)[:4]}")
    if unused:
        raise KeyError(f"generator weights the source transformer does not have: {sorted(unused)[:4]}")
    if len(written) == 1:
        os.replace(written[0][0], dst / WEIGHTS)
    else:
        weight_map = {}
        stem = WEIGHTS.removesuffix(".safetensors")
        for i, (path, keys) in enumerate(written, 1):
            name = f"{stem}-{i:05d}-of-{len(written):05d}.safetensors"
            os.replace(path, dst / name)
            weight_map |= dict.fromkeys(keys, name)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / f"{WEIGHTS}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"shards": len(written), "bytes": total, "largest_shard": largest}


def _write_scheduler(adapter, shift: float, dst: Path) -> None:
    sched = _scheduler(adapter)
    type(sched).from_config(sched.config, shift=shift, use_dynamic_shifting=False).save_pretrained(dst / "scheduler")


def _write_info(adapter, lora, alpha, merge_lora, steps: int, shift: float, dst: Path) -> None:
    sigmas = [1.0 - i / steps for i in range(steps)]  # pre-shift u points; the scheduler applies `shift`
    # Z-Image guides with pos + g (pos - neg) and turns CFG off at g = 0; SD3 guides with neg + g (pos - neg), off at 1.
    guidance = 0.0 if adapter.kind == "zimage" else 1.0
    info = {
        "model_kind": adapter.kind,
        "source": str(adapter.source),
        "lora": None if lora is None else ("merged" if merge_lora else LORA_FILE),
        "lora_alpha": alpha,
        "shift": shift,
        "pipeline_call": {"num_inference_steps": steps, "sigmas": sigmas, "guidance_scale": guidance},
    }
    (dst / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
