"""The owlv2_count reward: its counting logic on hand-made detections (threshold, duplicates, GenEval's clauses), and
the loading path end to end on a tiny random OWLv2 saved with save_pretrained (its scores equal a direct run of the
same detector on the same images)."""

import numpy as np
import pytest
import torch

from tdm_r1.config import RewardTermConfig
from tdm_r1.rewards import build_reward
from tdm_r1.rewards.base import RewardSetupError
from tdm_r1.rewards.geneval import geneval_score
from tdm_r1.rewards.owlv2_count import OwlCountOptions, clause_classes, cxcywh_to_xyxy, detections, nms

THREE_CATS = {"tag": "counting", "include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]}


def test_duplicates_and_weak_boxes_are_not_objects():
    boxes = np.array([[0.1, 0.1, 0.3, 0.3], [0.11, 0.1, 0.31, 0.3], [0.5, 0.5, 0.7, 0.7], [0.8, 0.1, 0.9, 0.2]])
    probs = np.array([[0.9, 0.1], [0.8, 0.1], [0.7, 0.1], [0.2, 0.4]])  # columns: cat, dog
    found = detections(probs, boxes, ["cat", "dog"], OwlCountOptions(threshold=0.3))
    assert [d[0][4] for d in found["cat"]] == pytest.approx([0.9, 0.7])  # box 2 overlaps box 1 (IoU 0.9): one cat
    assert [d[0][:4].tolist() for d in found["dog"]] == [boxes[3].tolist()]
    assert nms(boxes, probs[:, 0], iou=0.95) == [0, 1, 2, 3]  # below that overlap they stay apart
    assert cxcywh_to_xyxy(np.array([0.5, 0.5, 0.2, 0.4])).tolist() == pytest.approx([0.4, 0.3, 0.6, 0.7])


@pytest.mark.parametrize(("cats", "fraction"), [(3, 1.0), (2, 0.5), (4, 0.5), (0, 0.5)])
def test_counting_clauses_want_exactly_the_count(cats, fraction):
    boxes = np.array([[0.2 * i, 0.0, 0.2 * i + 0.1, 0.1] for i in range(5)])
    probs = np.array([[0.9 if i < cats else 0.05] for i in range(5)])
    found = detections(probs, boxes, ["cat"], OwlCountOptions())
    assert geneval_score(found, THREE_CATS, colors_of=None) == fraction  # 0 cats: the exclude clause still holds


def test_colour_and_position_clauses_are_left_to_geneval():
    assert clause_classes(THREE_CATS) == ["cat"]
    assert clause_classes({"include": [{"class": "cat", "count": 1, "color": "red"}]}) is None
    assert clause_classes({"include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position":
                                        ["left of", 0]}]}) is None  # fmt: skip
    assert clause_classes({}) == []


@pytest.fixture(scope="module")
def owl_folder(tmp_path_factory):
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = small | dict(
        vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1
    )
    cfg = Owlv2Config(text_config=text, vision_config=small | dict(image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(cfg).eval()
    path = tmp_path_factory.mktemp("owlv2")
    model.save_pretrained(path)
    Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    ).save_pretrained(path)
    return path


def test_the_saved_detector_scores_as_a_direct_run_of_it(owl_folder):
    from transformers import AutoProcessor, Owlv2ForObjectDetection

    from tdm_r1.rewards.pickscore import to_pil

    images = torch.rand(5, 3, 24, 40, generator=torch.Generator().manual_seed(1))
    dogs = {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
    targets = [THREE_CATS, dogs, THREE_CATS, {"include": [{"class": "cat", "count": 1, "color": "red"}]}, dogs]
    prompts = ["three cats", "two dogs", "three cats", "a red cat", "two dogs"]
    model = Owlv2ForObjectDetection.from_pretrained(owl_folder, local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(owl_folder, local_files_only=True)
    with torch.no_grad():
        out = model(**proc(text=[["a photo of a cat"]], images=to_pil(images[:1]), return_tensors="pt"))
    threshold = float(torch.sigmoid(out.logits).median())  # a random detector: about half of its patches pass
    for kind in ("fraction", "strict"):
        term = RewardTermConfig(name="owlv2_count", path=str(owl_folder), batch_size=2,
                                options={"threshold": threshold, "score": kind})  # fmt: skip
        got = build_reward(term)(images, prompts, targets)
        expect = []
        for i, meta in enumerate(targets):
            classes = clause_classes(meta)
            if not classes:
                expect.append(float("nan"))
                continue
            with torch.no_grad():
                o = model(**proc(text=[[f"a photo of a {c}" for c in classes]], images=to_pil(images[i : i + 1]),
                                 return_tensors="pt"))  # fmt: skip
            found = detections(torch.sigmoid(o.logits[0]).numpy(), cxcywh_to_xyxy(o.pred_boxes[0].numpy()), classes,
                               OwlCountOptions(threshold=threshold))  # fmt: skip
            s = geneval_score(found, meta, colors_of=None)
            expect.append(float(s == 1.0) if kind == "strict" else s)
        assert got.shape == (5,) and bool(torch.isnan(got[3]))
        assert got.tolist() == pytest.approx(expect, nan_ok=True, abs=1e-6), kind


def test_a_missing_or_incomplete_folder_is_named(tmp_path):
    with pytest.raises(RewardSetupError, match=r"owlv2_count.*'/no/such/owl' does not exist"):
        build_reward(RewardTermConfig(name="owlv2_count", path="/no/such/owl"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RewardSetupError, match=r"lacks tokenizer_config.json, preprocessor_config.json"):
        build_reward(RewardTermConfig(name="owlv2_count", path=str(tmp_path)))
    with pytest.raises(Exception, match=r"train.rewards\[owlv2_count\].options.*thresh"):
        build_reward(RewardTermConfig(name="owlv2_count", path=str(tmp_path), options={"thresh": 0.5}))
