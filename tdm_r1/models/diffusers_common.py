"""What the diffusers adapters (sd3.py, zimage.py) share: folder checks, offline loading, precision, attention
backend, the prompt-embedding cache, text-encoder offload and chunked VAE decode. Each adapter adds only what
differs: how prompts are encoded and how its transformer is called (its time and velocity convention).

Module layout: the transformer is the adapter's only submodule, so parameters, state_dict, LoRA targets and ZeRO
partitioning see the transformer alone. Text encoders, tokenizers and the VAE live in `FrozenParts` (the diffusers
pipeline object with its transformer detached), which a deep copy shares instead of copying: full-mode roles copy
the transformer, never the 4-5B-parameter text encoders.

Precision: `dtype` is the compute dtype of every forward. With `master_weights_fp32` the transformer's parameters
(and any LoRA weights added to it) stay fp32 - the "master weights" an optimizer updates, so small updates are not
rounded away - and each forward runs under torch.autocast(dtype), so matmuls run in bf16. Without it the parameters
themselves are stored in `dtype` (pure bf16); under DeepSpeed with bf16 enabled, the engine keeps the fp32 master
copy inside its optimizer partitions instead. Text encoders and VAE are frozen and stored in `dtype`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from tdm_r1.config import DiffusersConfig
from tdm_r1.models.base import Cond

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BACKEND_PACKAGES = {"flash": "flash_attn", "xformers": "xformers"}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")


class ModelFolderError(FileNotFoundError):
    """diffusers.path is not a complete local diffusers folder of the expected model; the message lists what is
    missing and how to get it."""


def check_model_folder(path: str, kind: str, components: dict[str, str], download_hint: str) -> Path:
    """Validate a local diffusers folder before loading. `components` maps subfolder -> "model" | "tokenizer" |
    "scheduler". Raises ModelFolderError naming every missing file at once."""
    if not path:
        raise ModelFolderError(f"diffusers.path is empty; set it to a local {kind} diffusers folder. {download_hint}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelFolderError(
            f"diffusers.path={path!r} is not a local folder (models load offline, never from the Hub). {download_hint}"
        )
    missing = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    for sub, role in components.items():
        d = root / sub
        if not d.is_dir():
            missing.append(f"{sub}/")
        elif role == "model":
            missing += _missing_model_files(d, sub)
        elif role == "tokenizer":
            if not (d / "tokenizer_config.json").is_file():
                missing.append(f"{sub}/tokenizer_config.json")
            if not any((d / f).is_file() for f in _TOKENIZER_FILES):
                missing.append(f"{sub}/ vocabulary (one of {', '.join(_TOKENIZER_FILES)})")
        elif not (d / "scheduler_config.json").is_file():
            missing.append(f"{sub}/scheduler_config.json")
    if missing:
        raise ModelFolderError(
            f"{root} is not a complete {kind} diffusers folder; missing: {', '.join(missing)}. {download_hint}"
        )
    return root


def _missing_model_files(d: Path, sub: str) -> list[str]:
    missing = [] if (d / "config.json").is_file() else [f"{sub}/config.json"]
    indexes = list(d.glob("*.index.json"))
    for index in indexes:  # sharded weights: every shard the index names must be there
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing += [f"{sub}/{s} (listed in {index.name})" for s in shards if not (d / s).is_file()]
    if not indexes and not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
        missing.append(f"{sub}/ weights (*.safetensors)")
    return missing


def resolve_attention_backend(requested: str) -> str:
    """'flash' | 'xformers' | 'sdpa' -> the backend that will run, decided once. A missing package or no CUDA device
    falls back to 'sdpa' with a warning that says why."""
    if requested == "sdpa":
        return "sdpa"
    if requested not in _BACKEND_PACKAGES:
        raise ValueError(f"unknown attention backend {requested!r}; expected sdpa, flash or xformers")
    package = _BACKEND_PACKAGES[requested]
    if importlib.util.find_spec(package) is None:
        reason = f"the `{package}` package is not installed (pip install 'tdm-r1[{requested}]')"
    elif not torch.cuda.is_available():
        reason = "it needs a CUDA device and none is available"
    else:
        return requested
    logger.warning("attention backend %r unavailable: %s; falling back to PyTorch SDPA", requested, reason)
    return "sdpa"


class FrozenParts:
    """The diffusers pipeline without its transformer (text encoders, tokenizers, VAE, scheduler config), plus the
    prompt cache. Not an nn.Module, and shared rather than copied by deepcopy (see the module notes)."""

    def __init__(self, pipe, cache_size: int):
        self.pipe = pipe
        self.cache: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self.cache_size = cache_size
        self.null: dict[str, Tensor] | None = None

    def __deepcopy__(self, memo):
        return self


class DiffusersFlowModel(nn.Module):
    """FlowModel over a diffusers transformer (DESIGN section 4). Subclasses set the class attributes and implement
    `_encode` (prompts -> batch-first tensors) and `_forward` (x, s, cond -> velocity in our convention)."""

    kind: str = ""
    components: dict[str, str] = {}
    default_max_sequence_length: int = 0
    download_hint: str = ""

    def __init__(self, transformer: nn.Module, pipe, cfg: DiffusersConfig, source: Path):
        super().__init__()
        pipe.register_modules(transformer=None)
        self.transformer = transformer
        self.frozen = FrozenParts(pipe, cfg.prompt_cache_size)
        self.cfg, self.source = cfg, Path(source)
        self.compute_dtype = DTYPES[cfg.dtype]
        self.max_sequence_length = cfg.max_sequence_length or self.default_max_sequence_length
        self.attention_backend = resolve_attention_backend(cfg.attention_backend)
        if self.attention_backend != "sdpa":
            self._set_attention_backend(self.attention_backend)
        logger.info("%s: attention backend %s", self.kind, self.attention_backend)
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()

    # -- per-model hooks -----------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def _forward(self, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    def _set_attention_backend(self, backend: str) -> None:
        raise NotImplementedError

    def _text_encoders(self) -> list[nn.Module]:
        raise NotImplementedError

    @property
    def latent_multiple(self) -> int:
        """Image sides must be multiples of this many pixels."""
        raise NotImplementedError

    # -- FlowModel protocol ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def vae(self) -> nn.Module:
        return self.frozen.pipe.vae

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def velocity(self, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        """Rectified-flow velocity eps - x0 at x [B, C, h, w], s [B]; output in the compute dtype."""
        if self.cfg.master_weights_fp32 and self.compute_dtype != torch.float32:
            with torch.autocast(x.device.type, dtype=self.compute_dtype):
                return self._forward(x.float(), s, cond)
        return self._forward(x.to(self.compute_dtype), s, cond)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Cond for `prompts`: each unique prompt not yet cached is encoded once (repeats share it); the empty
        prompt (Cond.null) is encoded once per model. The cache lives in host memory; Cond is on the model's device."""
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        fr = self.frozen
        todo = [p for p in dict.fromkeys(prompts) if p not in fr.cache]
        if fr.null is None and "" not in todo:
            todo.append("")
        rows = dict(zip(todo, self._encode_rows(todo))) if todo else {}
        for p in prompts:
            if p in fr.cache:
                rows[p] = fr.cache[p]
                fr.cache.move_to_end(p)
        if fr.null is None:
            fr.null = rows[""]
        for p in todo:
            fr.cache[p] = rows[p]
        while fr.cache_size > 0 and len(fr.cache) > fr.cache_size:
            fr.cache.popitem(last=False)
        device = self.device
        fields = {k: torch.stack([rows[p][k] for p in prompts]).to(device) for k in fr.null}
        return Cond(fields, {k: v[None].to(device) for k, v in fr.null.items()})

    def clear_prompt_cache(self) -> None:
        self.frozen.cache.clear()

    def _encode_rows(self, prompts: list[str]) -> list[dict[str, Tensor]]:
        device = self.device
        encoders = self._text_encoders()
        for m in encoders:
            m.to(device)
        # Every encoder call sees exactly encode_batch_size prompts (a short chunk is padded with the empty prompt):
        # matmul kernels choose their blocking by shape, so a prompt's embedding would otherwise depend on how many
        # prompts it was encoded with (the pooled CLIP output moved by 2.4e-7), and a resumed run, whose cache starts
        # empty, would not reproduce the uninterrupted run. With one shape a row's result depends on its prompt only.
        size = self.cfg.encode_batch_size
        rows = []
        with torch.no_grad():
            for i in range(0, len(prompts), size):
                chunk = prompts[i : i + size]
                out = self._encode(chunk + [""] * (size - len(chunk)), device)
                rows += [{k: v[j].cpu() for k, v in out.items()} for j in range(len(chunk))]
        if self.cfg.offload_text_encoders and device.type != "cpu":
            self.offload_text_encoders()
        return rows

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU (the next encode of an uncached prompt brings them back)."""
        for m in self._text_encoders():
            m.to("cpu")

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] float in [0, 1], `vae_decode_chunk` latents per VAE call."""
        vae = self.vae
        if next(vae.parameters()).device != x0.device:
            vae.to(x0.device)
        scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
        images = []
        for chunk in x0.split(max(1, self.cfg.vae_decode_chunk)):
            z = chunk.to(vae.dtype) / scale + shift
            img = vae.decode(z, return_dict=False)[0]
            images.append((img.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        m = self.latent_multiple
        if height % m or width % m:
            raise ValueError(f"{self.kind}: image {height}x{width} must have sides divisible by {m}")
        f = self.vae_scale_factor
        return (self.transformer.config.in_channels, height // f, width // f)


@contextlib.contextmanager
def _load_errors(kind: str, root: Path):
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        raise ModelFolderError(f"could not load {root} as a {kind} diffusers folder: {e}") from e


def load_pipeline(pipeline_cls, transformer_cls, root: Path, cfg: DiffusersConfig, kind: str):
    """(transformer, pipeline) from a checked local folder, never touching the network. The transformer is loaded in
    its parameter dtype (fp32 with master_weights_fp32), everything else in the compute dtype."""
    dtype = DTYPES[cfg.dtype]
    param_dtype = torch.float32 if cfg.master_weights_fp32 else dtype
    with _load_errors(kind, root):
        transformer = transformer_cls.from_pretrained(
            root, subfolder="transformer", dtype=param_dtype, local_files_only=True
        )
        pipe = pipeline_cls.from_pretrained(root, transformer=transformer, dtype=dtype, local_files_only=True)
    return transformer, pipe
