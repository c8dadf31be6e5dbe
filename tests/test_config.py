"""Tests for tlhelpers.config: modes, cache folder, seeding, setup line."""

import random
import sys

import numpy as np
import pytest
import torch

from tlhelpers import config


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True),
                                             ("YES", True), ("0", False),
                                             ("", False), ("no", False)])
def test_smoke_mode_reads_tlh_smoke(value, expected):
    assert config.smoke_mode({"TLH_SMOKE": value}) is expected


def test_by_mode_picks_the_smoke_value_only_in_smoke_mode():
    assert config.by_mode(100, 5, {"TLH_SMOKE": "1"}) == 5
    assert config.by_mode(100, 5, {}) == 100


def test_strict_and_offline_flags_are_independent():
    env = {"TLH_STRICT": "1"}
    assert config.strict_mode(env) and not config.offline_mode(env)


def test_cache_dir_honours_the_environment_and_creates_folders(tmp_path):
    env = {"TLH_CACHE_DIR": str(tmp_path / "c")}
    path = config.cache_dir("features", "x", environ=env)
    assert path == tmp_path / "c" / "features" / "x" and path.is_dir()


def test_default_cache_folder_is_the_operating_systems_one(monkeypatch,
                                                          tmp_path):
    import platformdirs

    asked = []

    def user_cache_dir(appname, appauthor=None, **kwargs):
        asked.append((appname, appauthor))
        return str(tmp_path / "os-cache" / appname)

    monkeypatch.setattr(platformdirs, "user_cache_dir", user_cache_dir)
    path = config.cache_dir("features", environ={})
    assert path == tmp_path / "os-cache" / "tlhelpers" / "features"
    assert path.is_dir() and asked == [("tlhelpers", False)]


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="XDG_CACHE_HOME is the Linux convention")
def test_default_cache_folder_follows_xdg_cache_home_on_linux(
        monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config.cache_dir(environ={}) == tmp_path / "xdg" / "tlhelpers"
    # TLH_CACHE_DIR still wins over the operating system's folder.
    env = {"TLH_CACHE_DIR": str(tmp_path / "mine")}
    assert config.cache_dir(environ=env) == tmp_path / "mine"


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    config.seed_everything(3)
    first = draw()
    config.seed_everything(3)
    assert draw() == first


def test_seed_must_be_an_int():
    with pytest.raises(TypeError, match="seed must be an int"):
        config.seed_everything("42")


def test_setup_prints_one_line_with_versions_device_and_mode(
        capsys, monkeypatch):
    monkeypatch.setenv("TLH_SMOKE", "1")
    device = config.setup(seed=1)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert "torch" in out[0] and f"device {device}" in out[0]
    assert "mode SMOKE" in out[0]


def test_get_device_honours_an_explicit_choice():
    assert config.get_device("cpu") == torch.device("cpu")
