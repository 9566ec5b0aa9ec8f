"""`owlv2_count`: GenEval-style counting with an open-vocabulary detector (OWLv2, through transformers) instead of
GenEval's mmdet 2.x Mask2Former: the counting reward a user can install with `pip install 'tdm-r1[detect]'`.

Each prompt's `.jsonl` metadata (GenEval's format) says what to count: {"prompt", "tag": "counting", "include":
[{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]} asks for exactly three cats. Per image the
detector is queried with `template` for every class the clauses name; a query's detections are the image patches
whose score (sigmoid of OWLv2's logit) is above `threshold`, most confident first, duplicates removed by greedy
non-maximum suppression (IoU above `nms_iou`), at most 16 per class (GenEval's cap). The clauses are then judged as
GenEval judges them (tdm_r1.rewards.geneval.geneval_score): `score: fraction` is the share of clauses satisfied,
`score: strict` is 1 exactly when all are (GenEval's accuracy). Colour and position clauses need GenEval's CLIP colour
classifier: a prompt with one is not judged (NaN, counted as a reward failure; use the `geneval` reward for those).

Local files (train.rewards[].path, never downloaded): a folder saved by `save_pretrained` of Owlv2ForObjectDetection
and its Owlv2Processor, for example

    huggingface-cli download google/owlv2-base-patch16-ensemble --local-dir models/owlv2

OWLv2's image processor needs scipy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from tdm_r1.config import RewardTermConfig
from tdm_r1.rewards.base import load_transformers_folder, require_package, reward_device, reward_options
from tdm_r1.rewards.geneval import MAX_OBJECTS, Detection, geneval_score
from tdm_r1.rewards.pickscore import to_pil

log = logging.getLogger(__name__)

HINT = "Save an OWLv2 detector and its processor into one folder (see tdm_r1/rewards/owlv2_count.py)."


@dataclass
class OwlCountOptions:
    threshold: float = 0.3  # detection score (sigmoid) above which a patch's box is an object of the query
    nms_iou: float = 0.5  # boxes of one class overlapping more than this are one object
    score: Literal["strict", "fraction"] = "strict"
    template: str = "a photo of a {}"  # the detector's text query for a class


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [N, M] of boxes [N, 4] and [M, 4] as (x1, y1, x2, y2)."""
    lo, hi = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, most confident first."""
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if order:
            overlap = box_iou(boxes[[i]], boxes[order])[0]
            order = [j for j, o in zip(order, overlap, strict=True) if o <= iou]
    return keep


def detections(probs: np.ndarray, boxes: np.ndarray, classes: list[str], opts: OwlCountOptions) -> dict:
    """Per class, the detections of one image from the detector's patch scores [P, Q] (one column per class's query)
    and boxes [P, 4] (x1, y1, x2, y2): above the threshold, after NMS, most confident first, at most MAX_OBJECTS; as
    tdm_r1.rewards.geneval's Detection (box with its confidence, no mask)."""
    out: dict[str, list[Detection]] = {}
    for q, cls in enumerate(classes):
        above = np.flatnonzero(probs[:, q] > opts.threshold)
        if not len(above):
            continue
        kept = [above[k] for k in nms(boxes[above], probs[above, q], opts.nms_iou)][:MAX_OBJECTS]
        out[cls] = [(np.concatenate([boxes[i], probs[i, q : q + 1]]), None) for i in kept]
    return out


def clause_classes(meta: dict) -> list[str] | None:
    """The classes a prompt's clauses count, in order; None when a clause needs colour or position (not judged here)."""
    clauses = meta.get("include", []) + meta.get("exclude", [])
    if any("color" in c or "position" in c for c in clauses):
        return None
    return list(dict.fromkeys(c["class"] for c in clauses))


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


class OwlCount:
    name = "owlv2_count"

    def __init__(self, path: str, opts: OwlCountOptions, device: str = "auto", batch_size: int = 16):
        install = "pip install 'tdm-r1[detect]'"
        files = ("tokenizer_config.json",)
        self.processor, model = load_transformers_folder(
            path, self.name, "a local OWLv2 folder", HINT, "Owlv2ForObjectDetection", install, files
        )
        require_package("scipy", self.name, f"{install}: OWLv2's image processor needs scipy")
        self.opts, self.batch_size, self.device = opts, batch_size, reward_device(device)
        self.model = model.to(self.device)
        self._warned: set[str] = set()

    def _detect(self, images: torch.Tensor, queries: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Patch scores [B, P, Q] and boxes [B, P, 4] (x1, y1, x2, y2, relative to the padded square image)."""
        inputs = self.processor(text=queries, images=to_pil(images), return_tensors="pt", padding=True)
        out = self.model(**inputs.to(self.device))
        probs = torch.sigmoid(out.logits.float()).cpu().numpy()
        return probs, cxcywh_to_xyxy(out.pred_boxes.float().cpu().numpy())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], targets: list[dict]) -> torch.Tensor:
        scores = torch.full((len(prompts),), float("nan"))
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, (prompt, meta) in enumerate(zip(prompts, targets, strict=True)):
            classes = clause_classes(meta)
            if not classes:
                why = "has colour or position clauses" if classes is None else "has no include / exclude clauses"
                if prompt not in self._warned:
                    self._warned.add(prompt)
                    log.warning("%s: prompt %r %s: not judged (NaN)", self.name, prompt, why)
                continue
            groups.setdefault(tuple(classes), []).append(i)
        for classes, rows in groups.items():
            queries = [self.opts.template.format(c) for c in classes]
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                probs, boxes = self._detect(images[chunk], [queries] * len(chunk))
                for k, i in enumerate(chunk):
                    found = detections(probs[k], boxes[k], list(classes), self.opts)
                    s = geneval_score(found, targets[i], colors_of=None)
                    scores[i] = float(s == 1.0) if self.opts.score == "strict" else s
        return scores


def build_owlv2_count(term: RewardTermConfig) -> OwlCount:
    return OwlCount(term.path, reward_options(term, OwlCountOptions), term.device, term.batch_size)
