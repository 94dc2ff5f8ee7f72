"""Flags generated from config dataclasses: types, presets, one group per registered defense."""

import argparse
import dataclasses

import pytest

from awm_jax.config_flags import (
    add_config_flags,
    add_defense_flags,
    config_from_flags,
    defense_flags_set,
)
from awm_jax.defenses import DEFENSES, get_defense
from awm_jax.defenses.ablation import AblationConfig, preset
from awm_jax.defenses.awm.config import AWMConfig
from awm_jax.defenses.nad import NADConfig


def _parse(argv, cls=None, prefix=""):
    parser = argparse.ArgumentParser()
    if cls is None:
        add_defense_flags(parser)
    else:
        add_config_flags(parser, cls, prefix)
    return parser.parse_args(argv)


def test_every_registered_defense_gets_its_fields_as_flags():
    parser = argparse.ArgumentParser()
    add_defense_flags(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    for name in DEFENSES.names():
        for field in dataclasses.fields(get_defense(name).config_class):
            assert f"--{name}-{field.name.replace('_', '-')}" in flags


def test_flag_types_follow_the_annotations():
    args = _parse(["--nad-layers", "Conv_0,Conv_1", "--nad-nesterov", "false",
                   "--awm-beta", "none", "--awm-outer-epochs", "3",
                   "--ablation-iterations", "none", "--ablation-threshold", "0.3"])
    assert config_from_flags(args, NADConfig, "nad_") == NADConfig(layers=("Conv_0", "Conv_1"),
                                                                   nesterov=False)
    assert config_from_flags(args, AWMConfig, "awm_") == AWMConfig(outer_epochs=3)
    assert config_from_flags(args, AblationConfig, "ablation_") == AblationConfig(
        iterations=None, threshold=0.3)
    with pytest.raises(SystemExit):
        _parse(["--awm-clip-outer", "maybe"])
    with pytest.raises(SystemExit):
        _parse(["--ft-epochs", "none"])  # not optional


def test_preset_flag_is_the_base_of_the_other_flags():
    args = _parse(["--ablation-preset", "awm", "--ablation-tau", "50"])
    assert config_from_flags(args, AblationConfig, "ablation_") == preset("awm", tau=50.0)
    assert defense_flags_set(args) == {"ablation": {"preset": "awm", "tau": 50.0}}
    assert defense_flags_set(_parse([])) == {}
    nad_args = _parse(["--nad-preset", "official", "--nad-lr-decay-epochs", "2,4"])
    assert config_from_flags(nad_args, NADConfig, "nad_") == NADConfig.preset(
        "official", lr_decay_epochs=(2, 4))
    with pytest.raises(SystemExit):
        _parse(["--ablation-preset", "nope"])



def test_awm_presets_are_flags_and_bases():
    args = _parse(["--awm-preset", "cifar10_one_shot", "--awm-tau", "50"])
    assert config_from_flags(args, AWMConfig, "awm_") == AWMConfig(
        batch_size=32, tau=50.0, alpha=0.99, mask_lr=1e-3)
    assert defense_flags_set(args)["awm"] == {"preset": "cifar10_one_shot", "tau": 50.0}
    assert AWMConfig.preset("official") == AWMConfig()
    assert AWMConfig.preset("official_one_shot", alpha=0.5) == AWMConfig(
        batch_size=32, tau=100.0, alpha=0.5)
    with pytest.raises(ValueError, match="unknown AWM preset 'nope'; known: official"):
        AWMConfig.preset("nope")
