"""What the course shows: tables, figures, and where they are shown.

Torch-free and quick to import (matplotlib and IPython are imported when
a function needs them), so the command line, the grader and the widgets
use it as well as the notebooks:

- ``Table``: rows of results that render as HTML in Jupyter and as
  aligned text in a terminal;
- ``pyplot``, ``figure_to_png``, ``show_figure``: a figure drawn, turned
  into PNG bytes, and shown once in a notebook;
- ``in_kernel``, ``is_pil``, ``as_history``: what a plot or a widget
  needs to know about where it runs and what it was given.
"""

import html
import io
import re
import sys
from collections.abc import Mapping

# Backends that never show a figure by themselves.
FILE_BACKENDS = ("agg", "cairo", "pdf", "pgf", "ps", "svg", "template")
_NUMERIC = re.compile(r"[-+]?[\d,.]+(e[-+]?\d+)?%?")


# ---------------------------------------------------------------- tables


class Table(list):
    """A list of dict rows that renders as HTML in Jupyter and as text."""

    def __init__(self, rows=(), columns=None, title=None):
        super().__init__(dict(r) for r in rows)
        if columns is None:
            columns = []
            for row in self:
                columns += [k for k in row if k not in columns]
        self.columns = list(columns)
        self.title = title

    def column(self, name):
        """Return one column as a list."""
        return [row.get(name) for row in self]

    @staticmethod
    def format_value(value):
        """Return a value as the table shows it (floats to 4 digits)."""
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
                return f"{value:.2e}"
            return f"{value:.4g}"
        if isinstance(value, int):
            return f"{value:,}"
        return "-" if value is None else str(value)

    def __str__(self):
        cells = [[self.format_value(r.get(c)) for c in self.columns]
                 for r in self]
        widths = [max([len(c)] + [len(row[i]) for row in cells])
                  for i, c in enumerate(self.columns)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(c.ljust(w)
                               for c, w in zip(self.columns, widths)))
        lines.append("  ".join("-" * w for w in widths))
        for row in cells:
            lines.append("  ".join(
                v.rjust(w) if _NUMERIC.fullmatch(v) else v.ljust(w)
                for v, w in zip(row, widths)))
        return "\n".join(lines)

    def _repr_html_(self):
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(
                f"<td>{html.escape(self.format_value(r.get(c)))}</td>"
                for c in self.columns) + "</tr>"
            for r in self)
        cap = (f"<caption>{html.escape(self.title)}</caption>"
               if self.title else "")
        return (f"<table>{cap}<thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table>")

    def __repr__(self):
        return self.__str__()


# ---------------------------------------------------------------- figures


def in_kernel():
    """Return True inside an IPython kernel (Jupyter, nbclient, nbval)."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def pyplot():
    """Import pyplot, leaving the choice of backend to matplotlib.

    matplotlib picks a window backend where one can be shown and Agg where
    none can (a headless server, CI); a Jupyter kernel brings its inline
    backend, and MPLBACKEND or matplotlib.use() win over both.
    """
    import matplotlib.pyplot as plt

    return plt


def figure_to_png(fig, dpi=None):
    """Render a figure to PNG bytes (what widgets and tests display)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def show_figure(fig):
    """Show a figure in the notebook once, and let pyplot forget it.

    A plot function draws with pyplot (so the notebook shows the figure
    when the cell ends) and returns the figure; left as a cell's last
    value it would be shown a second time. This shows it as a PNG and
    closes it in pyplot, so the inline backend does not draw it again; a
    window or widget backend, which shows it already, is left alone.
    """
    from matplotlib import get_backend

    backend = get_backend().lower()
    # pyplot gives a figure a manager until plt.close() takes it away.
    held = fig.canvas.manager is not None
    if held and "inline" not in backend and backend not in FILE_BACKENDS:
        return
    from IPython.display import Image, display

    display(Image(data=figure_to_png(fig), format="png"))
    if held:
        pyplot().close(fig)


# ---------------------------------------------------------------- inputs


def is_pil(image):
    """Return True for a PIL image (without importing PIL for others)."""
    if "PIL.Image" not in sys.modules:
        return False
    from PIL import Image

    return isinstance(image, Image.Image)


def as_history(history):
    """Return (epoch records, unfreeze events) from any history-like input.

    Accepts a training History (``.epochs`` and ``.events``), a list of
    epoch dicts, or a dict with "epochs" and "events" lists. Events may
    also ride inside an epoch dict under "events".
    """
    if isinstance(history, Mapping) and "epochs" in history:
        epochs, events = history["epochs"], history.get("events") or []
    elif hasattr(history, "epochs") and not isinstance(history,
                                                       (list, tuple)):
        epochs = history.epochs
        events = getattr(history, "events", None) or []
    elif isinstance(history, (list, tuple)):
        epochs, events = history, []
    else:
        raise TypeError(
            "expected a training history (what fit() returns) or a list of "
            f"epoch dicts, got {type(history).__name__}")
    if not all(isinstance(e, Mapping) for e in epochs):
        raise TypeError("every epoch record must be a dict with keys like "
                        "'epoch', 'train_loss', 'val_acc'")
    epochs = [dict(e) for e in epochs]
    events = list(events)
    for rec in epochs:
        events += list(rec.get("events") or [])
    return epochs, events
