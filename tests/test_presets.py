"""Training presets: the defaults, ``--preset reference`` (the DIEN reference), overrides."""

from __future__ import annotations

import pytest

import dinrec.train.trainer as trainer
from dinrec.cli import main
from dinrec.errors import DinrecError
from dinrec.train.trainer import TrainConfig, model_config_for, preset_config


def test_defaults_are_the_accurate_configuration():
    cfg = TrainConfig()
    assert (cfg.activation, cfg.bucket, cfg.model_options) == ("dice", False, {"attention": "din"})
    assert TrainConfig(model="dien").model_options == {}
    assert preset_config("default", "din") == cfg


def test_reference_preset_is_the_dien_reference():
    din = preset_config("reference", "din")
    assert (din.activation, din.bucket, din.model_options) == ("prelu", True, {"attention": "fcn"})
    dien = preset_config("reference", "dien")
    assert (dien.activation, dien.bucket, dien.model_options) == ("prelu", True, {})


def test_explicit_options_win_over_the_preset():
    cfg = preset_config("reference", "din", bucket=False, model_options={"attention_size": 80},
                        seed=3)
    assert (cfg.bucket, cfg.seed, cfg.activation) == (False, 3, "prelu")
    assert cfg.model_options == {"attention": "fcn", "attention_size": 80}
    with pytest.raises(DinrecError, match="unknown preset"):
        preset_config("fast", "din")


def test_saved_configs_keep_their_options():
    # a run folder written before the defaults changed rebuilds its model as it was
    old = TrainConfig.from_dict({**TrainConfig().to_dict(), "model_options": {}})
    assert old.model_options == {}
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


class _Vocab(list):
    pass


class _Store:
    class vocabs:  # noqa: N801 - stands in for the store's attribute
        user = item = cat = _Vocab([0, 1, 2])


def test_model_config_gets_the_attention_option():
    assert model_config_for(TrainConfig(), _Store())["attention"] == "din"
    assert model_config_for(preset_config("reference"), _Store())["attention"] == "fcn"


@pytest.mark.parametrize(
    "argv, expect",
    [
        ([], ("dice", False, {"attention": "din"})),
        (["--preset", "reference"], ("prelu", True, {"attention": "fcn"})),
        (["--preset", "reference", "--no-bucket", "--activation", "relu"], ("relu", False, {"attention": "fcn"})),
        (["--bucket", "--option", "attention=fcn"], ("dice", True, {"attention": "fcn"})),
    ],
)
def test_cli_train_resolves_the_preset(monkeypatch, tmp_path, argv, expect):
    seen = {}

    def fake_train(cfg, store, run, resume=False, overwrite=False):
        seen["cfg"] = cfg
        raise DinrecError("stop here")

    monkeypatch.setattr(trainer, "train", fake_train)
    assert main(["train", str(tmp_path / "store"), str(tmp_path / "run"), *argv]) == 2
    cfg = seen["cfg"]
    assert (cfg.activation, cfg.bucket, cfg.model_options) == expect
