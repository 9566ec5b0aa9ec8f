"""Keys of earlier versions still load (a run's config.yaml, the config inside a training state, an older recipe), in
today's names; each reward's options are checked by the reward itself; a resumed run compares configs in today's
keys."""

from pathlib import Path

import pytest
from utils import write_yaml as write

from tdm_r1.checkpoint import CheckpointError
from tdm_r1.checkpoint.resume import RESUMABLE_CHANGES, check_resume_config
from tdm_r1.config import ConfigError, RewardTermConfig, load_config, to_dict
from tdm_r1.rewards.base import build_reward, reward_options
from tdm_r1.rewards.ocr import OCROptions


def test_renamed_and_removed_keys_load_in_todays_names(tmp_path):
    cfg = load_config(write(tmp_path, "eval:\n  n_train: 5\nsample:\n  eta: 0.0\n  nfe: 8\n"))
    assert cfg.eval.train_subset == 5 and cfg.sample.nfe == 8
    assert "n_train" not in to_dict(cfg)["eval"] and "eta" not in to_dict(cfg)["sample"]


def test_the_former_reward_section_becomes_the_ocr_entrys_options(tmp_path):
    text = "reward:\n  name: ocr\n  tile_columns: 8\n  upscale: 3\ntrain:\n  rewards:\n    - {name: ocr}\n"
    text += "    - {name: dark_fraction, weight: 0.5}\n"
    cfg = load_config(write(tmp_path, text))
    ocr, dark = cfg.train.rewards
    assert ocr.options == {"tile_columns": 8}  # a value equal to the old default is not carried as a setting
    assert dark.options == {} and dark.weight == 0.5
    # without train.rewards the default entry (ocr) takes them
    assert load_config(write(tmp_path, "reward:\n  pad: 4\n")).train.rewards[0].options == {"pad": 4}


def test_a_rewards_options_are_checked_by_the_reward():
    assert reward_options(RewardTermConfig(options={"pad": 4}), OCROptions) == OCROptions(pad=4)
    with pytest.raises(ConfigError, match=r"train.rewards\[ocr\].options: unknown config key 'padding'"):
        reward_options(RewardTermConfig(options={"padding": 4}), OCROptions)
    with pytest.raises(ConfigError, match=r"train.rewards\[dark_fraction\].options: .*threshold: expected float"):
        build_reward("dark_fraction", threshold="dark")
    with pytest.raises(ConfigError, match="pickscore takes none"):
        build_reward(RewardTermConfig(name="pickscore", options={"size": 1}))


def test_resume_compares_configs_in_todays_keys():
    now = load_config(None, ["eval.train_subset=16"])
    saved = to_dict(now)
    saved["eval"]["n_train"] = saved["eval"].pop("train_subset")  # written before the rename
    saved["sample"]["eta"] = 0.0
    check_resume_config(saved, to_dict(now), Path("state"), RESUMABLE_CHANGES["train"])
    # a reward's thread count may change on resume; its other options may not
    threads = to_dict(load_config(None, ["train.rewards=[{name: ocr, options: {threads: 2}}]"]))
    check_resume_config(threads, to_dict(now), Path("state"), RESUMABLE_CHANGES["train"])
    tiles = to_dict(load_config(None, ["train.rewards=[{name: ocr, options: {tile_rows: 2}}]"]))
    with pytest.raises(CheckpointError, match=r"train.rewards.0.options.tile_rows"):
        check_resume_config(tiles, to_dict(now), Path("state"), RESUMABLE_CHANGES["train"])


def test_worlds_are_named_by_registry_or_import_path():
    from tdm_r1.worlds import BUILTIN_WORLDS, build_world

    assert set(BUILTIN_WORLDS) == {"ocr", "counting"}
    with pytest.raises(ValueError, match="unknown world 'nope'; registered: (ocr, counting|counting, ocr); or"):
        build_world(load_config(None, ["world.name=nope"]).world)
    with pytest.raises(ConfigError, match=r"world.options: the ocr world.s settings are world.\* keys"):
        build_world(load_config(None, ["world.options={font: x}"]).world)
