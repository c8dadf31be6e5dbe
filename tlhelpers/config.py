"""Course-wide settings: seed, device, SMOKE mode, cache folder.

torch is imported by the functions that need it (seed, device,
setup), so the command line, the runner and the grader import this
module at once.
"""

import os
import platform
import random
from pathlib import Path

import platformdirs

_TRUE = {"1", "true", "yes", "on"}


def _flag(name, environ=None):
    env = os.environ if environ is None else environ
    return env.get(name, "").strip().lower() in _TRUE


def smoke_mode(environ=None):
    """Return True when TLH_SMOKE asks for the small, fast configuration."""
    return _flag("TLH_SMOKE", environ)


def strict_mode(environ=None):
    """Return True when TLH_STRICT asks exercise checks to raise."""
    return _flag("TLH_STRICT", environ)


def offline_mode(environ=None):
    """Return True when TLH_OFFLINE forbids every download."""
    return _flag("TLH_OFFLINE", environ)


def show_progress(progress=None, environ=None):
    """Resolve a ``progress`` argument into show (True) or hide (False).

    True or False are taken as given. None, every course function's
    default, follows TLH_PROGRESS: "0" hides the bars (``tlcourse run``,
    the grader and the nbval passes set it, so headless runs stay quiet),
    anything else or unset shows them.
    """
    if progress is not None:
        return bool(progress)
    env = os.environ if environ is None else environ
    value = env.get("TLH_PROGRESS", "").strip().lower()
    return value not in {"0", "false", "no", "off"}


def by_mode(full, smoke, environ=None):
    """Pick the value for the current mode: `smoke` under TLH_SMOKE."""
    return smoke if smoke_mode(environ) else full


def default_cache_root():
    """Return this operating system's cache folder for the course."""
    return Path(platformdirs.user_cache_dir("tlhelpers", appauthor=False))


def cache_dir(*parts, environ=None):
    """Return (and create) the course cache folder, or a folder inside it.

    TLH_CACHE_DIR overrides the default: the operating system's cache
    folder, from platformdirs (``~/.cache/tlhelpers`` on Linux,
    ``~/Library/Caches/tlhelpers`` on macOS, under ``%LOCALAPPDATA%`` on
    Windows).
    """
    env = os.environ if environ is None else environ
    root = env.get("TLH_CACHE_DIR") or default_cache_root()
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_device(prefer=None):
    """Pick the fastest available device: CUDA, then Apple MPS, then CPU."""
    import torch

    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed):
    """Seed Python, NumPy and PyTorch so a run can be repeated."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def describe(device=None):
    """Return the one-line summary that setup() prints."""
    import torch

    import tlhelpers

    device = device or get_device()
    mode = "SMOKE" if smoke_mode() else "full"
    return (f"tlhelpers {tlhelpers.__version__} | torch {torch.__version__} "
            f"| python {platform.python_version()} | device {device} "
            f"| threads {torch.get_num_threads()} | mode {mode}")


def setup(seed=0, plots=True):
    """Seed everything, pick the device, set plot defaults, print one line.

    Returns the torch.device the notebook should use.
    """
    from tlhelpers import kernels

    seed_everything(seed)
    kernels.apply_in_process()
    device = get_device()
    if plots:
        import matplotlib as mpl

        mpl.rcParams.update({
            "figure.figsize": (6.4, 4.0),
            "figure.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
        })
    print(describe(device))
    return device
