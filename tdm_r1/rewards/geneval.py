"""GenEval (Ghosh et al. 2023) as a reward: an object detector checks the objects, counts, colours and relative
positions a prompt asks for, as described by that prompt's metadata (a `.jsonl` prompt file, one GenEval object per
line: {"prompt", "tag", "include": [{"class", "count", "color"?, "position"?: [relation, clause index]}],
"exclude": [{"class", "count"}]}).

score = fraction of the prompt's clauses satisfied (include and exclude alike); 1.0 exactly when GenEval counts the
image correct, so `reward_exact` of an evaluation is GenEval's accuracy. Detection follows GenEval's settings:
confidence above 0.3 (0.9 for `counting` prompts), at most 16 objects per class, most confident first; colour is a
CLIP ViT-L/14 zero-shot choice among ten colours on the object's masked crop (grey background); position compares box
centres after discounting 10% of the two boxes' sizes.

Local files (train.rewards[].path, never downloaded), as GenEval's own download script lays them out:
    <path>/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth   detector weights
    <path>/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py    its mmdetection config (default: mmdet's own copy)
    <path>/object_names.txt                                     the detector's class names, one per line
    <path>/ViT-L-14.pt                                          OpenAI CLIP ViT-L/14 weights (open_clip format)
Packages: mmdet 2.x with mmcv-full (GenEval's pins), open_clip_torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tdm_r1.config import ConfigError, RewardTermConfig
from tdm_r1.rewards.base import RewardSetupError, require_package, require_path, reward_device

log = logging.getLogger(__name__)

DETECTOR = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco"
THRESHOLD, COUNTING_THRESHOLD = 0.3, 0.9
MAX_OBJECTS = 16
POSITION_MARGIN = 0.1
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
COLOR_TEMPLATES = ["a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object"]
HINT = "Lay out the GenEval detector and CLIP files as tdm_r1/rewards/geneval.py describes."

# one detected object: box [x1, y1, x2, y2, confidence] and its mask [H, W] (None when the detector has no masks)
Detection = tuple[np.ndarray, np.ndarray | None]
ColorsOf = Callable[[list[Detection], str], list[str]]


def select_objects(
    boxes: list[np.ndarray], masks: list | None, classnames: list[str], tag: str | None
) -> dict[str, list[Detection]]:
    """Per class, the detections above the confidence threshold, most confident first, at most MAX_OBJECTS."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    out: dict[str, list[Detection]] = {}
    for i, name in enumerate(classnames):
        order = [j for j in np.argsort(-boxes[i][:, 4], kind="stable") if boxes[i][j, 4] > threshold][:MAX_OBJECTS]
        if order:
            out[name] = [(boxes[i][j], None if masks is None else masks[i][j]) for j in order]
    return out


def relative_position(a: np.ndarray, b: np.ndarray, margin: float = POSITION_MARGIN) -> set[str]:
    """Where box a lies relative to box b: a subset of {left of, right of, above, below} (image y points down). The
    centre offset shrinks by `margin` times the boxes' summed sizes first, so touching boxes have no relation."""
    ca, cb = (a[:2] + a[2:4]) / 2, (b[:2] + b[2:4]) / 2
    size = np.abs(a[2:4] - a[:2]) + np.abs(b[2:4] - b[:2])
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - margin * size, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = {"left of"} if dx < -0.5 else {"right of"} if dx > 0.5 else set()
    return rel | ({"above"} if dy < -0.5 else {"below"} if dy > 0.5 else set())


def geneval_score(objects: dict[str, list[Detection]], metadata: dict, colors_of: ColorsOf) -> float:
    """Fraction of the metadata's clauses the detected objects satisfy (NaN when it has none). An include clause needs
    `count` objects of its class (its most confident ones), all of `color` if given, each in `position` relative to
    every object matched by the clause it names; an exclude clause needs fewer than `count`."""
    include, exclude = metadata.get("include", []), metadata.get("exclude", [])
    if not include and not exclude:
        return float("nan")
    matched: list[list[Detection] | None] = []
    ok = 0
    for clause in include:
        found = objects.get(clause["class"], [])[: clause["count"]]
        good = len(found) >= clause["count"]
        if good and "color" in clause:
            good = colors_of(found, clause["class"]).count(clause["color"]) >= clause["count"]
        if good and "position" in clause:
            relation, target = clause["position"]
            others = matched[target] if target < len(matched) else None
            good = others is not None and all(relation in relative_position(o[0], t[0]) for o in found for t in others)
        matched.append(found if good else None)
        ok += good
    ok += sum(len(objects.get(c["class"], [])) < c["count"] for c in exclude)
    return ok / (len(include) + len(exclude))


class GenEval:
    name = "geneval"

    def __init__(self, path: str, device: str = "auto", batch_size: int = 32):
        root = require_path(path, self.name, "a folder with the GenEval detector and CLIP files", HINT)
        mmdet = require_package("mmdet", self.name, "GenEval's detector: mmdet 2.x with mmcv-full")
        open_clip = require_package("open_clip", self.name, "pip install open_clip_torch")
        config = root / f"{DETECTOR}.py"
        if not config.is_file():
            config = Path(mmdet.__file__).parent.parent / "configs" / "mask2former" / f"{DETECTOR}.py"
        files = [root / f"{DETECTOR}.pth", root / "object_names.txt", root / "ViT-L-14.pt", config]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise RewardSetupError(f"reward 'geneval': missing {', '.join(missing)}. {HINT}")
        from mmdet.apis import inference_detector, init_detector

        self.device = reward_device(device)
        self.batch_size = batch_size
        self.classnames = [ln.strip() for ln in (root / "object_names.txt").read_text().splitlines() if ln.strip()]
        self.detector = init_detector(str(config), str(files[0]), device=str(self.device))
        self._detect = inference_detector
        self.clip, _, self.transform = open_clip.create_model_and_transforms(
            "ViT-L-14", pretrained=str(files[2]), device=self.device
        )
        self.clip.eval()
        self.tokenizer = open_clip.get_tokenizer("ViT-L-14")
        self._classifiers: dict[str, torch.Tensor] = {}

    def _classifier(self, cls: str) -> torch.Tensor:
        """[D, colours]: mean normalised text embedding of the colour templates for this class."""
        if cls not in self._classifiers:
            weights = []
            for c in COLORS:
                tokens = self.tokenizer([t.format(c=c, cls=cls) for t in COLOR_TEMPLATES]).to(self.device)
                emb = self.clip.encode_text(tokens).float()
                emb = (emb / emb.norm(dim=-1, keepdim=True)).mean(0)
                weights.append(emb / emb.norm())
            self._classifiers[cls] = torch.stack(weights, 1)
        return self._classifiers[cls]

    def _colors(self, image: Image.Image, found: list[Detection], cls: str) -> list[str]:
        blank = Image.new("RGB", image.size, color="#999")
        crops = []
        for box, mask in found:
            img = image if mask is None else Image.composite(image, blank, Image.fromarray(mask))
            crops.append(self.transform(img.crop(tuple(float(v) for v in box[:4]))))
        emb = self.clip.encode_image(torch.stack(crops).to(self.device)).float()
        logits = (emb / emb.norm(dim=-1, keepdim=True)) @ self._classifier(cls)
        return [COLORS[i] for i in logits.argmax(1).tolist()]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], targets: list[dict]) -> torch.Tensor:
        if not any("include" in t or "exclude" in t for t in targets):
            raise ValueError("reward 'geneval' needs each prompt's GenEval metadata: give prompts as .jsonl files")
        arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        scores = []
        for rgb, meta, prompt in zip(arr, targets, prompts):
            result = self._detect(self.detector, np.ascontiguousarray(rgb[..., ::-1]))  # mmdet reads BGR arrays
            boxes, masks = result if isinstance(result, tuple) else (result, None)
            objects = select_objects(boxes, masks, self.classnames, meta.get("tag"))
            pil = Image.fromarray(rgb)
            score = geneval_score(objects, meta, lambda found, cls, pil=pil: self._colors(pil, found, cls))
            if np.isnan(score):
                log.warning("geneval: prompt %r has no include / exclude clauses to check", prompt)
            scores.append(score)
        return torch.tensor(scores, dtype=torch.float32)


def build_geneval(term: RewardTermConfig) -> GenEval:
    if term.options:
        raise ConfigError(f"train.rewards[geneval].options: geneval takes none, got {sorted(term.options)}")
    return GenEval(term.path, term.device, term.batch_size)
