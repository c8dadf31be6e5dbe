"""A cohort release: the notebooks as shipped and a learner build.

The learner build is a wheel of ``tlhelpers`` in which every exercise's
reference solution is removed: ``solution_code`` is absent and
``solution()`` says that the instructor withheld the solutions. Hints stay.
The instructor's own install keeps the solutions, so ``tlcourse run
--solutions`` and ``tlcourse grade`` work on the instructor's side.

The solutions are removed from the source text before the wheel is built
(every ``solution_code = ...`` assignment in a class body of
``exercises.py``), and the built wheel is searched for each solution's
text: a release that still holds one is never written.
"""

import ast
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tlhelpers import files

EXERCISES_FILE = "tlhelpers/exercises.py"
SOLUTION_ATTRIBUTE = "solution_code"
# What the project folder must hold to build a wheel from it, and what
# goes along when present.
SOURCE_FILES = ("pyproject.toml", "README.md")
OPTIONAL_FILES = ("LICENSE",)
MANIFEST = "release.json"


class ReleaseError(RuntimeError):
    """A cohort release cannot be made; the message says what to do."""


def _solution_nodes(tree):
    """Yield the `solution_code = ...` assignments in class bodies."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            targets = (stmt.targets if isinstance(stmt, ast.Assign)
                       else [stmt.target] if isinstance(stmt, ast.AnnAssign)
                       else [])
            if any(isinstance(t, ast.Name) and t.id == SOLUTION_ATTRIBUTE
                   for t in targets):
                yield stmt


def strip_solutions(source):
    """Return Python source with every class's `solution_code` removed.

    Raises ReleaseError when the result would not compile.
    """
    tree = ast.parse(source)
    drop = set()
    for stmt in _solution_nodes(tree):
        drop.update(range(stmt.lineno, stmt.end_lineno + 1))
    lines = source.splitlines(keepends=True)
    kept = "".join(line for number, line in enumerate(lines, 1)
                   if number not in drop)
    try:
        compile(kept, EXERCISES_FILE, "exec")
    except SyntaxError as err:
        raise ReleaseError(f"removing the solutions broke {EXERCISES_FILE}"
                           f" ({err}); keep each `solution_code = ...` a "
                           "statement of its own") from err
    return kept


def solution_texts(exercises_module=None):
    """Return {exercise name: reference solution code} of this install."""
    if exercises_module is None:
        from tlhelpers import exercises as exercises_module
    return {name: ex.solution_code
            for name, ex in exercises_module.EXERCISES.items()
            if getattr(ex, SOLUTION_ATTRIBUTE, "")}


def normalise(text):
    """Return code with blank lines and surrounding spaces removed."""
    return "\n".join(line.strip() for line in text.splitlines()
                     if line.strip())


def find_solutions(texts, solutions):
    """Return the names of the solutions found in any of `texts`."""
    flat = [normalise(t) for t in texts]
    return sorted(name for name, code in solutions.items()
                  if any(normalise(code) in t for t in flat))


def course_root(course=None):
    """Return the course's source folder (the one with pyproject.toml)."""
    if course is None:
        import tlhelpers

        course = Path(tlhelpers.__file__).resolve().parent.parent
    course = Path(course)
    missing = [f for f in SOURCE_FILES + (EXERCISES_FILE,)
               if not (course / f).is_file()]
    if missing:
        raise ReleaseError(
            f"{course} is not the course's source folder (missing: "
            f"{', '.join(missing)}). Run tlcourse release in a clone of "
            "the course, or give the folder with --course DIR.")
    return course


def _copy_source(course, dest):
    for name in SOURCE_FILES + OPTIONAL_FILES:
        if (course / name).is_file():
            shutil.copy2(course / name, dest / name)
    shutil.copytree(course / "tlhelpers", dest / "tlhelpers",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    exercises = dest / EXERCISES_FILE
    exercises.write_text(
        strip_solutions(exercises.read_text(encoding="utf-8")),
        encoding="utf-8")


def build_learner_wheel(course, out_dir):
    """Build the learner wheel of `course` into `out_dir`; return its path.

    Uses the setuptools already installed (no download, no build
    isolation).
    """
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="tlh-release-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        _copy_source(Path(course), src)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps",
               "--no-build-isolation", "--disable-pip-version-check",
               "--quiet", "--wheel-dir", str(Path(tmp) / "dist"), str(src)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ReleaseError(
                "building the learner wheel failed:\n"
                + (done.stderr or done.stdout).strip()[-2000:]
                + "\nIs setuptools installed (pip install setuptools)?")
        wheels = sorted((Path(tmp) / "dist").glob("tlhelpers-*.whl"))
        if len(wheels) != 1:
            raise ReleaseError(f"expected one tlhelpers wheel, got "
                               f"{[w.name for w in wheels]}")
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / wheels[0].name
        shutil.copy2(wheels[0], target)
    return target


def wheel_texts(wheel):
    """Return the text of every file inside a wheel."""
    with zipfile.ZipFile(wheel) as zf:
        return [zf.read(n).decode("utf-8", "replace") for n in zf.namelist()]


def _notebooks(course):
    from tlhelpers import exercises

    found = sorted((Path(course) / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise ReleaseError(f"no course notebooks in {course}/notebooks")
    for path in found:
        nb = json.loads(path.read_text(encoding="utf-8"))
        dirty = [i + 1 for i, c in enumerate(nb["cells"])
                 if c.get("cell_type") == "code"
                 and (c.get("outputs") or c.get("execution_count"))]
        if dirty:
            raise ReleaseError(
                f"{path.name} has stored outputs (cells {dirty}): clear "
                "them first (jupyter nbconvert --clear-output --inplace)")
        problems = exercises.check_cell_problems(nb)
        if problems:
            raise ReleaseError(f"{path.name} breaks the exercise "
                               f"convention: {'; '.join(problems)}")
    return found


LEARNER_README = """\
# {title}

Install the course helpers, then open the first notebook:

```bash
python -m pip install "{wheel}[lab]"
jupyter lab notebooks/00_welcome.ipynb
```

Exercises check themselves: run the check cell under each answer.
`exercises.<name>.hint()` helps; the reference solutions are withheld
for this cohort.
"""


def release(out, course=None, title="Transfer learning: the workbook"):
    """Write a cohort release to the new folder `out`; return its manifest.

    `out` gets ``notebooks/`` (as shipped), ``wheels/`` (the learner
    build, without solutions), a README and ``release.json``. The folder
    is built beside `out` and renamed into place at the end, so a failed
    release leaves nothing behind. An existing non-empty `out` is an
    error, never overwritten.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseError(f"{out} already exists and is not empty: "
                           "choose a new folder, or remove it first")
    course = course_root(course)
    notebooks = _notebooks(course)
    solutions = solution_texts()
    if not solutions:
        raise ReleaseError("this install of tlhelpers holds no solutions: "
                           "make the release from the instructor's "
                           "install (a clone of the course)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.",
                                    dir=out.parent))
    staging.chmod(0o755)
    try:
        wheel = build_learner_wheel(course, staging / "wheels")
        leaked = find_solutions(wheel_texts(wheel), solutions)
        if leaked:
            raise ReleaseError("the learner wheel still holds the "
                               f"solutions of {', '.join(leaked)}")
        (staging / "notebooks").mkdir()
        for path in notebooks:
            shutil.copy2(path, staging / "notebooks" / path.name)
        files.write_text(staging / "README.md", LEARNER_README.format(
            title=title, wheel=f"wheels/{wheel.name}"))
        manifest = {
            "wheel": f"wheels/{wheel.name}",
            "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "notebooks": [p.name for p in notebooks],
            "solutions": "withheld",
            "exercises": sorted(solutions),
        }
        files.write_text(staging / MANIFEST,
                         json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
