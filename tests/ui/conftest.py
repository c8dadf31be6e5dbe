"""Fixtures for the browser tests: a private JupyterLab and a chromium.

JupyterLab runs on 127.0.0.1 with a random port and a token, on a copy of
the course notebooks, in SMOKE mode with progress bars shown (no
TLH_PROGRESS: the learner's view), with a kernel that is this Python and
settings of its own (no news pop-up, every cell kept in the page). The
browser is Debian's `chromium`, started by us and driven by Playwright
over the DevTools protocol (Playwright's own browser download is never
used). Both are started once per test process (each pytest-xdist worker
gets its own port and folders) and always stopped by process group in a
`finally` block. One tab holds JupyterLab for the whole session; each
test opens its notebook in it, and closes it (its kernel shut down)
when done.

The tests are skipped, with the reason, when chromium, Playwright or
JupyterLab is missing; in CI (the CI variable is set, as .ci/run does)
that is a failure instead.
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the tests skip (or fail in CI) with the reason
    PlaywrightTimeout = TimeoutError

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SHOTS = ROOT / "_build" / "ui"
START_TIMEOUT = 120  # seconds for JupyterLab or chromium to answer


def _missing():
    """Return why the browser tests cannot run here, or None."""
    if shutil.which("chromium") is None:
        return ("chromium is not installed (Debian/Ubuntu: "
                "apt-get install chromium)")
    for module, package in (("playwright.sync_api", "playwright"),
                            ("jupyterlab", "jupyterlab")):
        try:
            __import__(module)
        except ImportError:
            return (f"{package} is not installed "
                    f"(python -m pip install {package})")
    return None


def _skip_unless_available():
    """Skip (in CI: fail) when a tool the browser tests need is missing."""
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI needs the browser tests, but {reason}",
                    pytrace=False)
    pytest.skip(f"browser tests: {reason}")


# ---------------------------------------------------------------- processes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, log, env=None, cwd=None):
    """Start a command in its own process group, output to a log file."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)


def _stop(proc, grace=10):
    """Stop a process and everything in its process group, by pid."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group the process leads
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:  # whatever is left of the group, the leader or its children
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _tail(log, n=3000):
    try:
        return Path(log).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _lab_environment(home):
    """Environment of the server and its kernels: private, SMOKE mode."""
    env = dict(os.environ)
    # The learner's view: progress bars shown (no TLH_PROGRESS=0 from a
    # headless pass), no strict checks, no grader settings.
    for key in ("TLH_STRICT", "TLH_LIVE", "TLH_PROGRESS", "TQDM_DISABLE",
                "JPY_SESSION_NAME", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH"):
        env.pop(key, None)
    env.update(
        TLH_SMOKE="1",
        TLH_CACHE_DIR=str(home / "cache"),
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        MPLCONFIGDIR=str(home / "matplotlib"),
        PYTHONUNBUFFERED="1",
    )
    # The kernel the notebooks ask for ("python3") is this Python.
    _write_json(home / "data" / "kernels" / "python3" / "kernel.json", {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                 "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python",
        "metadata": {"debugger": False}})
    settings = home / "settings" / "@jupyterlab"
    # No news or update pop-ups over the notebook.
    _write_json(settings / "apputils-extension" /
                "notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False})
    # Every cell stays in the page, so the tests can see all outputs.
    _write_json(settings / "notebook-extension" /
                "tracker.jupyterlab-settings", {"windowingMode": "none"})
    return env


class Lab:
    """A running JupyterLab: its URL, token and notebook folder."""

    def __init__(self, url, token, folder, proc, log):
        self.url, self.token, self.folder = url, token, folder
        self.proc, self.log = proc, log

    def api(self, path, method="GET"):
        """Call the server's REST API; return the decoded JSON or None."""
        req = urllib.request.Request(
            f"{self.url}{path}", method=method,
            headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def app_url(self):
        """The address that opens JupyterLab on an empty workspace."""
        return f"{self.url}/lab?reset&token={self.token}"

    def shutdown_kernels(self):
        """Shut down every kernel, so the next notebook starts fresh."""
        for session in self.api("/api/sessions"):
            self.api(f"/api/sessions/{session['id']}", method="DELETE")
        for kernel in self.api("/api/kernels"):
            self.api(f"/api/kernels/{kernel['id']}", method="DELETE")


def _wait_for_lab(url, token, proc, log):
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}:"
                               f"\n{_tail(log)}")
        try:
            req = urllib.request.Request(
                f"{url}/api/status",
                headers={"Authorization": f"token {token}"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer within "
                       f"{START_TIMEOUT} s:\n{_tail(log)}")


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """Start JupyterLab on a copy of the notebooks; stop it afterwards."""
    _skip_unless_available()
    home = tmp_path_factory.mktemp("lab")
    folder = home / "notebooks"
    folder.mkdir()
    for path in NOTEBOOKS:
        shutil.copy2(path, folder / path.name)
    env = _lab_environment(home)
    token = secrets.token_hex(16)
    proc = None
    try:
        for attempt in range(3):  # a port taken meanwhile: try another
            port = _free_port()
            log = home / f"jupyterlab-{attempt}.log"
            proc = _start([
                sys.executable, "-m", "jupyterlab", "--no-browser",
                "--allow-root", "--ServerApp.open_browser=False",
                "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={folder}",
                "--LabApp.news_url=", "--LabApp.check_for_updates_class="
                "jupyterlab.NeverCheckForUpdate",
                # window.jupyterapp: open and close notebooks in one page
                "--LabApp.expose_app_in_browser=True",
            ], log, env=env, cwd=folder)
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_for_lab(url, token, proc, log)
                break
            except RuntimeError:
                _stop(proc)
                proc = None
                if attempt == 2:
                    raise
        yield Lab(url, token, folder, proc, log)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Start Debian's chromium and connect Playwright to it."""
    _skip_unless_available()
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium")
    log = profile.parent / f"{profile.name}.log"
    proc = _start([
        shutil.which("chromium"), "--headless=new", "--no-sandbox",
        "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--no-default-browser-check", "--disable-extensions",
        "--disable-background-networking", "--mute-audio",
        f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0", "about:blank",
    ], log)
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while not (active.exists() and active.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start:\n{_tail(log)}")
            time.sleep(0.2)
        port = int(active.read_text().split()[0])
        with sync_playwright() as pw:
            chrome = pw.chromium.connect_over_cdp(f"http://127.0.0.1:{port}")
            try:
                yield chrome
            finally:
                chrome.close()
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def lab_page(browser, lab):
    """One tab with JupyterLab loaded, shared by every test: notebooks
    open and close inside it, with no page load per notebook."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(lab.app_url())
        page.wait_for_function("() => window.jupyterapp !== undefined",
                               timeout=START_TIMEOUT * 1000)
        page.evaluate("() => window.jupyterapp.restored.then(() => true)")
        yield page
    finally:
        context.close()


@contextlib.contextmanager
def _tab(page, lab):
    try:
        yield NotebookPage(page, lab)
    finally:
        try:
            page.evaluate(_CLOSE_ALL)
        finally:
            try:
                lab.shutdown_kernels()
            except OSError:
                pass


@pytest.fixture(scope="session")
def new_tab(lab_page, lab):
    """Open a notebook tab: `with new_tab() as notebook:` gives a
    NotebookPage; its notebooks close, unsaved changes dropped, and the
    kernels shut down when the block ends."""
    return lambda: _tab(lab_page, lab)


@pytest.fixture
def notebook(new_tab):
    """A NotebookPage on a fresh tab."""
    with new_tab() as nb:
        yield nb


@pytest.fixture(scope="session")
def shots():
    """The folder for screenshots, a CI artifact."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


# ---------------------------------------------------------------- the page

_PROMPTS = ".jp-Notebook .jp-CodeCell .jp-InputArea-prompt"
# Busy: the kernel is not idle, or a cell runs or waits to run ([*]).
_BUSY = f"""() => {{
  const status = [...document.querySelectorAll('.jp-StatusBar-TextItem')]
      .map(e => e.innerText).filter(t => t.includes('|')).join(' ');
  const queued = [...document.querySelectorAll({_PROMPTS!r})]
      .some(p => p.innerText.includes('*'));
  return !status.includes('| Idle') || queued;
}}"""
# Quiet for `settle` ms in a row (the page remembers since when).
_QUIET = f"""(settle) => {{
  const now = performance.now();
  if (({_BUSY})()) {{ window.__quietSince = null; return false; }}
  if (window.__quietSince == null) window.__quietSince = now;
  return now - window.__quietSince >= settle;
}}"""
_KERNEL_READY = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const session = w && w.sessionContext && w.sessionContext.session;
  const kernel = session && session.kernel;
  return !!kernel && kernel.status === 'idle'
      && kernel.connectionStatus === 'connected';
}"""
# Close every document in the main area, dropping unsaved changes.
_CLOSE_ALL = """() => {
  const app = window.jupyterapp;
  for (const w of Array.from(app.shell.widgets('main'))) {
    if (w.context) w.context.model.dirty = false;
    w.dispose();
  }
}"""
_TWO_FRAMES = ("() => new Promise(r => requestAnimationFrame("
               "() => requestAnimationFrame(r)))")
# Records every <img> and progress bar added to the page (one observer
# for the page's life; each call starts a new record).
_WATCH = """() => {
  window.__seen = [];
  if (window.__watching) return;
  window.__watching = true;
  const cells = () => [...document.querySelectorAll(
      '.jp-Notebook .jp-CodeCell')];
  const record = (kind, node) => {
    const cell = node.closest('.jp-CodeCell');
    if (!cell) return false;  // not in a cell (yet)
    const prompt = cell.querySelector('.jp-InputArea-prompt');
    window.__seen.push({kind, cell: cells().indexOf(cell),
                        src: node.getAttribute('src') || '',
                        running: (prompt ? prompt.innerText : '')
                                 .includes('*'),
                        t: performance.now()});
    return true;
  };
  // ipywidgets draws a progress bar as .widget-hprogress (or vprogress)
  const BAR = '.widget-hprogress, .widget-vprogress';
  const bars = new WeakSet();
  const bar = (n) => {
    if (!bars.has(n) && record('progress', n)) bars.add(n);
  };
  const look = (node) => {
    if (node.nodeType !== 1) return;
    const found = [node, ...node.querySelectorAll('img, ' + BAR)];
    for (const n of found) {
      if (n.tagName === 'IMG') record('img', n);
      else if (n.matches(BAR)) bar(n);
    }
  };
  new MutationObserver((mutations) => {
    for (const m of mutations) {
      m.addedNodes.forEach(look);
      if (m.type !== 'attributes') continue;
      if (m.attributeName === 'src' && m.target.tagName === 'IMG') {
        record('img', m.target);
      } else if (m.attributeName === 'class' && m.target.matches(BAR)) {
        bar(m.target);  // classes a view adds once it is in the page
      }
    }
  }).observe(document.body, {childList: true, subtree: true,
                             attributes: true,
                             attributeFilter: ['src', 'class']});
}"""


class NotebookPage:
    """Drive one notebook in JupyterLab the way a learner does."""

    RUN_TIMEOUT = 900  # seconds for a whole notebook, slow machines too

    def __init__(self, page, lab):
        self.page, self.lab = page, lab

    def open(self, name):
        """Open a notebook and wait until its kernel is idle."""
        self.page.evaluate(
            "(path) => window.jupyterapp.commands.execute("
            "'docmanager:open', {path, factory: 'Notebook'})"
            ".then(() => true)", name)
        self.page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
        panels = self.page.locator(".jp-NotebookPanel")
        assert panels.count() == 1, f"{panels.count()} notebooks open"
        # This notebook's own kernel, started and connected (the status
        # bar may still show the last notebook's for a moment).
        self.page.wait_for_function(_KERNEL_READY, polling=100,
                                    timeout=180_000)
        self.wait_idle(timeout=180)

    def kernel_status(self):
        """The status bar's kernel item, e.g. 'Python 3 (ipykernel) |
        Idle'."""
        texts = self.page.locator(".jp-StatusBar-TextItem").all_inner_texts()
        return " ".join(t for t in texts if "|" in t)

    def prompts(self):
        """The execution prompts of the code cells: '[3]:', '[*]:', '[ ]:'."""
        return [p.strip() for p in self.page.locator(
            ".jp-Notebook .jp-CodeCell .jp-InputArea-prompt")
            .all_inner_texts()]

    def busy(self):
        """Whether a cell runs or waits to run, or the kernel is busy."""
        return self.page.evaluate(f"() => ({_BUSY})()")

    def wait_idle(self, timeout=None, settle=0.5):
        """Wait until nothing runs (and stays so for `settle` seconds).

        The page itself polls (every 100 ms): no fixed sleeps, and no
        round trip to Python per look.
        """
        timeout = timeout or self.RUN_TIMEOUT
        self.page.evaluate("() => { window.__quietSince = null; }")
        try:
            self.page.wait_for_function(
                _QUIET, arg=settle * 1000, polling=100,
                timeout=timeout * 1000)
        except PlaywrightTimeout:
            raise AssertionError(
                f"still busy after {timeout} s: kernel "
                f"{self.kernel_status()!r}, prompts {self.prompts()}"
            ) from None

    def menu(self, menu, command):
        """Click a top menu, then the item that runs `command`."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=menu) \
            .first.click()
        item = self.page.locator(
            f'.lm-Menu-item[data-command="{command}"]')
        item.wait_for(state="visible")
        item.click()

    def run_all(self):
        """Run > Run All Cells, then wait for the kernel to finish."""
        self.menu("Run", "runmenu:run-all")
        # Started: a cell runs or waits ([*]), or every cell has run.
        self.page.wait_for_function(
            f"() => ({_BUSY})() || [...document.querySelectorAll("
            f"{_PROMPTS!r})].every(p => /\\[\\d+\\]/.test(p.innerText))",
            polling=100, timeout=60_000)
        self.wait_idle()

    def watch(self):
        """Record, from now on, every image and progress bar the page
        adds, with its code cell and whether that cell was running."""
        self.page.evaluate(_WATCH)

    def seen(self, kind):
        """What watch() recorded: dicts with kind ("img" or "progress"),
        cell (its index among code cells), src, running, t (ms)."""
        return [e for e in self.page.evaluate("() => window.__seen || []")
                if e["kind"] == kind]

    def save(self):
        """File > Save Notebook; wait until the tab is no longer dirty."""
        self.menu("File", "docmanager:save")
        self.page.wait_for_function(
            "() => !document.querySelector("
            "'.jp-NotebookPanel:not(.lm-mod-hidden) .jp-mod-dirty, "
            ".lm-TabBar-tab.lm-mod-current.jp-mod-dirty')")

    def error_texts(self):
        """Texts of error outputs: tracebacks and widgets that failed."""
        errors = self.page.locator(
            '.jp-OutputArea-output[data-mime-type='
            '"application/vnd.jupyter.stderr"]').all_inner_texts()
        errors = [t for t in errors if "Traceback" in t
                  or re.search(r"^\w*(Error|Exception)\b", t, re.M)]
        broken = self.page.locator(".jp-OutputArea-output").filter(
            has_text="Error displaying widget").all_inner_texts()
        return errors + broken

    def screenshot(self, path):
        """Save the whole notebook, top to bottom, as one PNG."""
        page = self.page
        height = page.evaluate(
            "() => Math.max(...[...document.querySelectorAll("
            "'.jp-NotebookPanel .jp-WindowedPanel-outer, "
            ".jp-NotebookPanel .jp-Notebook')].map(e => e.scrollHeight))")
        size = page.viewport_size
        try:
            page.set_viewport_size({"width": size["width"],
                                    "height": int(min(max(height + 200,
                                                          size["height"]),
                                                      16000))})
            page.evaluate(_TWO_FRAMES)  # the layout follows the size
            page.evaluate(
                "() => document.querySelectorAll('.jp-NotebookPanel "
                ".jp-WindowedPanel-outer').forEach(e => { e.scrollTop = 0 })")
            page.evaluate(_TWO_FRAMES)
            page.screenshot(path=str(path))
        finally:
            page.set_viewport_size(size)

    def code_cell(self, index):
        """The index-th code cell (from 0) as a Playwright locator."""
        return self.page.locator(".jp-Notebook .jp-CodeCell").nth(index)

