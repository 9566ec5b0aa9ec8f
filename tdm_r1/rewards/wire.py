"""The reward service's wire format, shared by the server (`tdm-r1 reward-server`) and the `remote` reward: images
as base64 PNG (8-bit, one channel when the image is grey, RGB otherwise), plain JSON around them, nothing pickled.

Request  POST /score   {"request_id": str, "images": [base64 PNG], "prompts": [str], "metadata": [object] (optional)}
Response 200           {"request_id": str, "scores": [number | null], "errors": [str | null]}
         4xx / 5xx     {"error": str}
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch
from PIL import Image


class WireError(ValueError):
    """A request that does not follow the format; the message names the field or sample."""


def png_bytes(image: torch.Tensor) -> bytes:
    """[C, H, W] float in [0, 1] -> PNG bytes, 8-bit, rounded to the nearest level (as the OCR reward rounds); one
    channel when the image is grey."""
    x = (image.detach().float().cpu().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
    if x.shape[0] == 3 and bool((x[0] == x[1]).all() and (x[1] == x[2]).all()):
        x = x[:1]
    arr = x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_png(image: torch.Tensor) -> str:
    """[C, H, W] float in [0, 1] -> base64 PNG (png_bytes)."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


def decode_png(data: object, index: int, max_side: int) -> torch.Tensor:
    """base64 PNG -> [3, H, W] float in [0, 1]; a WireError naming sample `index` when it is not one."""
    if not isinstance(data, str):
        raise WireError(f"images[{index}]: expected a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise WireError(f"images[{index}]: not base64 ({e})") from e
    return png_tensor(raw, index, max_side)


def png_tensor(raw: bytes, index: int, max_side: int) -> torch.Tensor:
    """PNG bytes -> [3, H, W] float in [0, 1]; a WireError naming sample `index` when they are not one."""
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise WireError(f"images[{index}]: not a PNG")
    try:
        img = Image.open(io.BytesIO(raw))
        if max(img.size) > max_side:
            raise WireError(f"images[{index}]: {img.size[0]}x{img.size[1]} exceeds the {max_side} px limit")
        img.load()
    except WireError:
        raise
    except Exception as e:  # PIL's own errors for truncated or corrupt files
        raise WireError(f"images[{index}]: not a valid PNG ({e})") from e
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
