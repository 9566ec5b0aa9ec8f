from pathlib import Path

import pytest
from utils import write_yaml as write

from tdm_r1.config import Config, ConfigError, load_config, save_config


def test_defaults_and_values(tmp_path):
    cfg = load_config(write(tmp_path, "seed: 7\nworld:\n  jitter_x: 3\npretrain:\n  lr: 1\n"))
    assert isinstance(cfg, Config)
    assert cfg.seed == 7 and cfg.world.jitter_x == 3
    assert cfg.pretrain.lr == 1.0 and isinstance(cfg.pretrain.lr, float)  # int accepted for float
    assert cfg.model.dim == 128  # untouched default


def test_unknown_key_names_dotted_path_and_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "world:\n  colour: red\n"))
    msg = str(e.value)
    assert "world.colour" in msg and "jitter_x" in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match="'pretrian'"):
        load_config(write(tmp_path, "pretrian:\n  steps: 3\n"))


@pytest.mark.parametrize(
    "text, key, expected",
    [
        ("pretrain:\n  steps: 1.5\n", "pretrain.steps", "expected int"),
        ("pretrain:\n  steps: true\n", "pretrain.steps", "expected int"),
        ("world:\n  font_sizes: [12, big]\n", "world.font_sizes[1]", "expected int"),
        ("world:\n  font_sizes: 12\n", "world.font_sizes", "expected a list"),
        ("sample:\n  solver: heun\n", "sample.solver", "one of"),
        ("world: 3\n", "world", "expected a mapping"),
        ("run_dir: 5\n", "run_dir", "expected str"),
    ],
)
def test_wrong_type_names_key_and_expected_type(tmp_path, text, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert key in str(e.value) and expected in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_set_overrides_parse_yaml_and_validate(tmp_path):
    cfg = load_config(write(tmp_path, "seed: 1\n"), ["seed=3", "world.font_sizes=[10, 12]", "sample.cfg=4.5"])
    assert cfg.seed == 3 and cfg.world.font_sizes == [10, 12] and cfg.sample.cfg == 4.5
    with pytest.raises(ConfigError, match="world.nope"):
        load_config(None, ["world.nope=1"])
    with pytest.raises(ConfigError, match="pretrain.steps"):
        load_config(None, ["pretrain.steps=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["seed"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["seed=11", "world.jitter_y=2"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_shipped_configs_load():
    cfg = load_config("configs/toy_ocr_teacher.yaml")
    assert cfg.world.name == "ocr"
    shipped = sorted(Path("configs").glob("*.yaml"))
    assert len(shipped) >= 6
    for path in shipped:
        cfg = load_config(path)
        if path.name.startswith(
            ("toy_ocr_r1", "toy_ocr_layout_r1", "toy_ocr_blot_r1")
        ):  # TDM-R1 configs run from the repository's files
            files = (
                cfg.world.train_words,
                cfg.world.heldout_words,
                cfg.roles.teacher,
                cfg.roles.generator_init,
                cfg.roles.fake_init,
            )
            for f in files:
                assert f is None or Path(f).is_file(), f"{path}: {f}"


@pytest.mark.parametrize(("name", "size"), [("toy_ocr_r1.yaml", 32), ("toy_ocr_r1_full.yaml", 64)])
def test_r1_configs_train_on_a_pool_of_train_words(name, size):
    cfg = load_config(Path("configs") / name)
    pool = Path(cfg.world.train_words).read_text().split()
    assert pool == Path("configs/words/ocr_train.txt").read_text().split()[:size]
    train_seeds = cfg.eval.seeds if cfg.eval.train_seeds is None else cfg.eval.train_seeds
    assert cfg.eval.train_subset >= len(pool) and cfg.eval.train_rows and train_seeds > 1
    assert not set(pool) & set(Path(cfg.world.heldout_words).read_text().split())


@pytest.mark.parametrize(("name", "field", "value"), [("layout", "jitter_x", 48), ("blot", "blot_prob", 0.5)])
def test_world_configs_share_the_shipped_teachers_world(name, field, value):
    from tdm_r1.checkpoint import read_model

    teacher_path = f"checkpoints/toy_ocr_{name}_teacher.safetensors"
    _, model_cfg, world, info = read_model(teacher_path)
    assert getattr(world, field) == value and info.get("kind") == "teacher"
    teacher = load_config(f"configs/toy_ocr_{name}_teacher.yaml")
    assert teacher.world == world and teacher.model == model_cfg
    for config in (f"toy_ocr_{name}_distill.yaml", f"toy_ocr_{name}_r1.yaml"):
        cfg = load_config(Path("configs") / config)
        assert cfg.world == world, config
        assert cfg.roles.teacher == teacher_path, config
    r1 = load_config(f"configs/toy_ocr_{name}_r1.yaml")
    assert r1.world.train_words == "configs/words/ocr_train.txt" and r1.eval.seeds > 1  # the stream, paired gain


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # PyYAML reads "1e-3" as a string; a float field takes it as the number it spells
    cfg = load_config(write(tmp_path, "pretrain:\n  lr: 1e-3\n"), ["sample.cfg=2E+0"])
    assert cfg.pretrain.lr == 1e-3 and cfg.sample.cfg == 2.0
    with pytest.raises(ConfigError, match="world.font_sizes"):
        load_config(None, ["world.font_sizes=[1e1]"])  # not an int
