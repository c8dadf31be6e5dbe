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


@pytest.mark.parametrize("value, expected", [
    (None, True), ("", True), ("1", True), ("0", False), ("off", False),
    ("false", False)])
def test_show_progress_follows_tlh_progress_when_not_told(value, expected):
    environ = {} if value is None else {"TLH_PROGRESS": value}
    assert config.show_progress(None, environ) is expected
    # An explicit argument wins over the environment, both ways.
    assert config.show_progress(True, {"TLH_PROGRESS": "0"}) is True
    assert config.show_progress(False, {}) is False


def test_headless_kernels_hide_progress_bars_unless_asked():
    from tlhelpers import runner

    assert runner.kernel_env({})["TLH_PROGRESS"] == "0"
    assert runner.kernel_env({"TLH_PROGRESS": "1"})["TLH_PROGRESS"] == "1"


def test_fit_shows_no_bar_under_tlh_progress_0(monkeypatch, capsys):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from tlhelpers import training

    data = TensorDataset(torch.randn(8, 3), torch.tensor([0, 1] * 4))
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for value, shown in (("0", False), ("1", True)):
        monkeypatch.setenv("TLH_PROGRESS", value)
        training.fit(net, DataLoader(data, batch_size=4), None, opt, 1)
        err = capsys.readouterr().err
        assert ("fit:" in err) is shown, (value, err)


def test_the_command_line_modules_import_without_torch():
    """config imports torch only when a function needs it, so cli,
    runner, grading and what they import at the top load at once."""
    import subprocess

    code = ("import sys\n"
            "import tlhelpers.cli, tlhelpers.config, tlhelpers.display\n"
            "import tlhelpers.grading, tlhelpers.kernels, tlhelpers.runner\n"
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib')\n"
            "             if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
