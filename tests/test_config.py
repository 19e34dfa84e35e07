"""Config parsing, overrides, schema validation, `_component_` instantiation."""

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from qatune.config import ConfigError, apply_overrides, instantiate, load_yaml, validate


@dataclass
class Section:
    path: str = "a/b"
    dtype: str = "auto"


@dataclass
class Schema:
    batch_size: int = 4
    lr_scale: float = 1.0
    name: str | None = None
    section: Section = field(default_factory=Section)
    optimizer: dict[str, Any] = field(default_factory=lambda: {"_component_": "torch.optim.SGD", "lr": 0.1})
    tags: list[str] = field(default_factory=list)


def cfg_of(**kw):
    return OmegaConf.create(kw)


def test_overrides_set_nested_and_parse_yaml_values():
    cfg = cfg_of(batch_size=4, section={"path": "x"}, optimizer={"_component_": "torch.optim.AdamW", "lr": 1e-3})
    apply_overrides(cfg, ["batch_size=8", "section.path=/tmp/m", "optimizer.lr=1e-5", "+tags=[a, b]"])
    assert cfg.batch_size == 8 and isinstance(cfg.batch_size, int)
    assert cfg.section.path == "/tmp/m"
    assert cfg.optimizer.lr == pytest.approx(1e-5)
    assert list(cfg.tags) == ["a", "b"]


def test_override_of_unknown_key_names_it_and_suggests():
    cfg = cfg_of(batch_size=4, seed=0)
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_sise'.*did you mean batch_size"):
        apply_overrides(cfg, ["batch_sise=3"])
    with pytest.raises(ConfigError, match="no_such_key"):
        apply_overrides(cfg, ["no_such_key=3"])


def test_override_component_keyword_checked_against_signature():
    cfg = cfg_of(optimizer={"_component_": "torch.optim.AdamW", "lr": 1e-3})
    apply_overrides(cfg, ["optimizer.weight_decay=0.1"])  # AdamW takes weight_decay: allowed without '+'
    assert cfg.optimizer.weight_decay == 0.1
    with pytest.raises(ConfigError, match="optimizer.momentun"):
        apply_overrides(cfg, ["optimizer.momentun=0.9"])


def test_delete_and_malformed_overrides():
    cfg = cfg_of(a={"b": 1, "c": 2})
    apply_overrides(cfg, ["~a.b"])
    assert "b" not in cfg.a and cfg.a.c == 2
    with pytest.raises(ConfigError, match="cannot delete 'a.z'"):
        apply_overrides(cfg, ["~a.z"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(cfg, ["batch_size"])
    with pytest.raises(ConfigError, match="not a valid dotted key"):
        apply_overrides(cfg, ["a..b=1"])


def test_validate_fills_defaults_and_rejects_unknown_and_bad_types():
    merged = validate(cfg_of(batch_size=2), Schema)
    assert merged.batch_size == 2 and merged.section.dtype == "auto" and merged.optimizer.lr == 0.1
    with pytest.raises(ConfigError, match=r"unknown config key 'section.pth'.*did you mean path"):
        validate(cfg_of(section={"pth": "x"}), Schema)
    with pytest.raises(ConfigError, match=r"unknown config key 'epochz'"):
        validate(cfg_of(epochz=1), Schema)
    with pytest.raises(ConfigError, match="batch_size"):
        validate(cfg_of(batch_size="four"), Schema)


def test_validate_checks_components_and_interpolation():
    with pytest.raises(ConfigError, match=r"torch.optim.AdamV.*not found.*did you mean"):
        validate(cfg_of(optimizer={"_component_": "torch.optim.AdamV"}), Schema)
    with pytest.raises(ConfigError, match=r"optimizer.betas2: not a parameter of torch.optim.SGD"):
        validate(cfg_of(optimizer={"_component_": "torch.optim.SGD", "betas2": 1}), Schema)
    with pytest.raises(ConfigError, match="interpolation"):
        validate(cfg_of(name="${missing.key}"), Schema)
    assert validate(cfg_of(name="${section.path}"), Schema).name == "a/b"


def test_instantiate_passes_args_kwargs_and_nested_components():
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = instantiate(OmegaConf.create({"_component_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9}), params)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    node = {"_component_": "torch.nn.Sequential", "_unused": None}
    with pytest.raises(TypeError):
        instantiate(node)  # unknown kwargs reach the callable and fail there, loudly
    lin = instantiate({"_component_": "torch.nn.Linear", "in_features": 3, "out_features": 2})
    assert lin.weight.shape == (2, 3)


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(lst)
