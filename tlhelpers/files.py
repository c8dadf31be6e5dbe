"""Files written whole or not at all.

Checkpoints, feature caches, downloads, built pages and gradebooks are all
written the same way: into a temporary file beside the target, flushed to
disk, then renamed over the target in one step. A crash, an interrupt or a
full disk leaves either the old file or the new one, never half of one.
"""

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, mode=0o644):
    """Yield a temporary path beside `path`; rename it to `path` on success.

    Write the new file under the yielded name. When the block finishes,
    the file is synced to disk, given `mode` (None keeps mkstemp's
    owner-only 0o600) and renamed over `path`. When the block raises, the
    temporary file is removed and `path` is left exactly as it was.

        with atomic_path("model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                               suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # data on disk before the rename
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def sha256(path, chunk=1 << 20):
    """Return the hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path, text, encoding="utf-8"):
    """Write `text` to `path` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def save(obj, path):
    """`torch.save(obj, path)`, atomically; return the path."""
    import torch  # imported here: the command line starts without torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)
