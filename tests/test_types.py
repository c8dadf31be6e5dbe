"""The notebook-facing API type-checks: mypy over [tool.mypy]'s files."""

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = ("models", "data", "features", "training", "strategies")


def mypy_config():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["mypy"]


def test_the_type_check_covers_the_notebook_facing_modules():
    checked = {Path(f).stem for f in mypy_config()["files"]}
    assert checked == set(API)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed: pip install -e '.[dev]'")
def test_the_notebook_facing_api_type_checks(tmp_path):
    """mypy finds no error in the type hints of the modules notebooks use.

    It reads its settings (the files, ignore_missing_imports) from
    pyproject.toml; its cache goes to a temporary folder.
    """
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path),
         "--no-error-summary"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
