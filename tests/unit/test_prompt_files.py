"""Prompt files of diffusers runs (tdm_r1/worlds/prompts.py): formats, the target text of OCR prompts, and errors that
name the file and line."""

import json

import pytest

from tdm_r1.config import ConfigError, DiffusersConfig, PromptsConfig, load_config
from tdm_r1.worlds.ocr import PromptFileError
from tdm_r1.worlds.prompts import build_prompt_world, quoted_text, read_prompts


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    ("prompt", "text"),
    [
        ('a sign that says "OPEN"', "OPEN"),
        ("a mug with \u201cgood morning\u201d on it", "good morning"),
        ('first "A B" then "C"', "A B"),
        ("a cat's toy", None),  # an apostrophe is not a quote
        ('empty "" quotes', None),
    ],
)
def test_quoted_text(prompt, text):
    assert quoted_text(prompt) == text


def test_txt_file_one_prompt_per_line(tmp_path):
    p = write(tmp_path / "p.txt", 'a sign that says "HI"\n  red cube  \n')
    assert read_prompts(p) == (['a sign that says "HI"', "red cube"], {})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"p\.txt: no prompts \(the file is empty\)"),
        ("a\n\nb\n", ":2: empty line"),
        (b"ok\n\xff\xfe\n", ":2: not valid UTF-8"),
    ],
)
def test_malformed_txt_is_refused_with_the_line(tmp_path, content, message):
    with pytest.raises(PromptFileError, match=message):
        read_prompts(write(tmp_path / "p.txt", content))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PromptFileError, match=f"prompt file not found: {tmp_path / 'nope.txt'}"):
        read_prompts(tmp_path / "nope.txt")


def test_ocr_prompts_must_quote_their_text(tmp_path):
    p = write(tmp_path / "p.txt", 'a sign that says "HI"\nred cube\n')
    assert read_prompts(p)[0] == ['a sign that says "HI"', "red cube"]  # fine for other rewards
    with pytest.raises(PromptFileError, match=r"p\.txt:2: 'red cube' has no double-quoted target text"):
        read_prompts(p, need_text=True)


def test_jsonl_gives_metadata(tmp_path):
    rows = [
        {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]},
        {"prompt": "two dogs", "tag": "counting", "include": [{"class": "dog", "count": 2}]},
    ]
    p = write(tmp_path / "m.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    prompts, meta = read_prompts(p)
    assert prompts == ["a photo of a cat", "two dogs"] and meta["two dogs"] == rows[1]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a"}', "{oops"], r":2: not a JSON object"),
        (['{"text": "a"}'], r':1: expected a JSON object with a non-empty "prompt" string'),
        (['["a"]'], r':1: expected a JSON object with a non-empty "prompt" string'),
        (['{"prompt": "a", "tag": "x"}', '{"prompt": "a", "tag": "y"}'], r":2: prompt 'a' repeats line 1 with other"),
    ],
)
def test_malformed_jsonl_is_refused_with_the_line(tmp_path, lines, message):
    with pytest.raises(PromptFileError, match=message):
        read_prompts(write(tmp_path / "m.jsonl", "\n".join(lines) + "\n"))


def test_prompt_world(tmp_path):
    train = write(tmp_path / "t.txt", 'a sign that says "HI"\nblue sky\n')
    heldout = write(tmp_path / "h.txt", 'say "A"\nsay "B"\nsay "C"\n')
    pc = PromptsConfig(train=str(train), heldout=str(heldout), heldout_limit=2)
    world = build_prompt_world(pc, DiffusersConfig(height=64, width=96))
    assert world.items("train") == ['a sign that says "HI"', "blue sky"]
    assert world.items("heldout") == ['say "A"', 'say "B"'] and (world.height, world.width) == (64, 96)
    assert world.prompt("blue sky") == "blue sky"
    # the reward targets: the quoted text to render; a prompt that quotes none has no text target
    assert world.targets(['say "B"', "blue sky"]) == [{"text": "B"}, {}]
    with pytest.raises(ConfigError, match="prompts.train is empty"):
        build_prompt_world(PromptsConfig(heldout=str(heldout)), DiffusersConfig())


def test_prompts_section_is_in_the_strict_schema():
    cfg = load_config(None, ["prompts.train=a.txt", "prompts.heldout_limit=8"])
    assert (cfg.prompts.train, cfg.prompts.heldout, cfg.prompts.heldout_limit) == ("a.txt", "", 8)
    with pytest.raises(ConfigError, match="unknown config key 'prompts.test'"):
        load_config(None, ["prompts.test=a.txt"])


def test_an_eval_prompt_file_adds_its_metadata_to_the_world(tmp_path):
    from tdm_r1.worlds.prompts import PromptWorld

    world = PromptWorld([], [], 64, 64, {"two cats": {"prompt": "two cats", "count": 2}})
    extra = tmp_path / "eval.jsonl"
    extra.write_text(
        json.dumps({"prompt": "three dogs", "count": 3}) + "\n" + json.dumps({"prompt": "two cats", "count": 2})
    )
    assert world.read_items(str(extra)) == ["three dogs", "two cats"]
    assert world.targets(["three dogs"]) == [{"prompt": "three dogs", "count": 3}]
    clash = tmp_path / "clash.jsonl"
    clash.write_text(json.dumps({"prompt": "two cats", "count": 5}) + "\n")
    with pytest.raises(PromptFileError, match="'two cats' has other metadata"):
        world.read_items(str(clash))
    assert world.targets(["two cats"]) == [{"prompt": "two cats", "count": 2}]  # the clash changed nothing
