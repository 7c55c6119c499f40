import pytest

from mmvssl.config import load_config
from mmvssl.errors import ConfigError
from mmvssl.resources import data_path


def test_demo_config_loads_with_overrides():
    cfg = load_config(data_path("configs", "demo", "tiny.yaml"), ["train.max_steps=7", "data.batch_size=4"])
    assert cfg.train.max_steps == 7 and cfg.data.batch_size == 4
    assert [t.loss for t in cfg.objective.terms] == ["nce", "mil_nce"]


# every experiment config (configs/accelerate/ holds accelerate's launcher files, another schema)
@pytest.mark.parametrize("path", sorted(p for p in data_path("configs").rglob("*.yaml") if "accelerate" not in p.parts))
def test_every_shipped_config_validates(path):
    load_config(path)


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match="max_stpes"):
        load_config(None, ["train.max_stpes=3"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("train:\n  lr: 0.1\n  warmpu_steps: 3\n")
    with pytest.raises(ConfigError, match=r"x\.yaml.*warmpu_steps"):
        load_config(f)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="max_steps"):
        load_config(None, ["train.max_steps=many"])


def test_missing_file_and_bad_override_form():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.max_steps"])
