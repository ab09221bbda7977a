"""tvae_em.config is the only source of defaults: the command line shows and uses its values, and its presets are
the models and recipes they name."""

import dataclasses

import pytest

from tvae_em.cli import cli
from tvae_em.config import MODEL_PRESETS, TRAIN_PRESETS, ModelConfig, TrainConfig, option_default, split_options
from tvae_em.errors import UsageError


def test_every_train_option_defaults_to_the_configuration():
    command = cli.commands["train"]
    given = command.make_context("train", ["particles.star", "-o", "run"]).params  # what train() receives
    options = {param.name: param for param in command.params}
    checked = 0
    for config_class in (ModelConfig, TrainConfig):
        for field in dataclasses.fields(config_class):
            # not an option, the box or the recipe decides, or (--ctf) a request that ctf.ctf_mode resolves
            if field.name not in options or given[field.name] is None or field.name == "ctf":
                continue
            assert given[field.name] == field.default, field.name
            checked += 1
    assert checked >= 15
    # the recipe's settings are left to the preset; their help shows every preset's value
    for name in ("batch_size", "epochs", "lr", "coarse_to_fine"):
        assert given[name] is None
        assert all(f"{preset} {TRAIN_PRESETS[preset].get(name, option_default(TrainConfig, name))}"
                   in options[name].help for preset in TRAIN_PRESETS), name


def test_presets_are_the_models_and_recipes_they_name():
    assert ModelConfig.preset("cryoem", image_size=64) == ModelConfig(image_size=64)
    assert (ModelConfig(image_size=64).likelihood, ModelConfig(image_size=64).generator_depth) == ("gaussian", 6)
    mnist = ModelConfig.preset("mnist", image_size=50, z_dim=3)
    assert (mnist.likelihood, mnist.generator_depth, mnist.z_dim) == ("bernoulli", 2, 3)
    assert option_default(ModelConfig, "generator_depth", "mnist") == 2
    assert TrainConfig.preset("paper").lr == TRAIN_PRESETS["paper"]["lr"] != TrainConfig().lr
    with pytest.raises(UsageError, match="unknown model preset 'cryo'; expected one of cryoem, mnist"):
        ModelConfig.preset("cryo", image_size=64)
    assert set(MODEL_PRESETS) == {"cryoem", "mnist"}


def test_options_are_split_by_the_configurations_field_names():
    train, model = split_options({"lr": 1e-3, "seed": 2, "z_dim": 4, "likelihood": "bernoulli"})
    assert train == {"lr": 1e-3, "seed": 2} and model == {"z_dim": 4, "likelihood": "bernoulli"}
    with pytest.raises(TypeError, match="unknown settings: warp_speed"):
        split_options({"warp_speed": 9})
