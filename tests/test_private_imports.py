"""No tlhelpers module uses another module's private names.

A name with a leading underscore is a module's own business: it may
change without notice. Read from the source with ast: ``from
tlhelpers.x import _name`` (or ``from .x import _name``), and
``x._name`` where ``x`` is another tlhelpers module imported under any
name, anywhere in the file (inside functions too).
"""

import ast
from pathlib import Path

import tlhelpers

PACKAGE = "tlhelpers"


def _private(name):
    return name.startswith("_") and not name.startswith("__")


def _module_aliases(tree, modules):
    """Return {local name: package module} for every module import."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) == 2 \
                        and parts[1] in modules and alias.asname:
                    aliases[alias.asname] = parts[1]
        elif isinstance(node, ast.ImportFrom):
            if node.module == PACKAGE or (node.level and not node.module):
                for alias in node.names:
                    if alias.name in modules:
                        aliases[alias.asname or alias.name] = alias.name
    return aliases


def _imported_from(node, modules):
    """Return the package module an ImportFrom reads names from, or None."""
    if node.level and node.module:
        base = node.module.split(".")[0]
    elif node.module and node.module.startswith(PACKAGE + "."):
        base = node.module.split(".")[1]
    else:
        return None
    return base if base in modules else None


def private_uses(package_dir):
    """Return "module:line: what" for each use of another's private name."""
    files = {p.stem: p for p in Path(package_dir).glob("*.py")}
    modules = set(files) - {"__init__"}
    found = []
    for name, path in sorted(files.items()):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        aliases = _module_aliases(tree, modules)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _imported_from(node, modules)
                if node.module == PACKAGE or (node.level
                                              and not node.module):
                    bad = [a.name for a in node.names
                           if _private(a.name)]
                elif source is not None and source != name:
                    bad = [a.name for a in node.names
                           if _private(a.name)]
                else:
                    bad = []
                found += [f"{name}:{node.lineno}: imports {b} from "
                          f"{source or PACKAGE}" for b in bad]
            elif (isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id in aliases
                    and aliases[node.value.id] != name
                    and _private(node.attr)):
                found.append(f"{name}:{node.lineno}: uses "
                             f"{aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = private_uses(Path(tlhelpers.__file__).parent)
    assert not found, (
        "tlhelpers modules use each other's private names:\n  "
        + "\n  ".join(found) + "\nmake the name public (and documented) "
        "in its module, or move the code that needs it there")


def test_every_form_of_private_use_is_found(tmp_path):
    sources = {
        "low": "def _helper():\n    pass\n\ndef public():\n    pass\n",
        "a": "from tlhelpers.low import _helper\n",
        "b": "from .low import _helper, public\n",
        "c": ("def f():\n    from tlhelpers import low\n"
              "    return low._helper()\n"),
        "d": ("import tlhelpers.low as lo\n"
              "from tlhelpers import low as other\n"
              "x = lo._helper, other._helper\n"),
        "e": "from tlhelpers import _private_module\n",
        "ok": ("from tlhelpers import low\nfrom tlhelpers.low import "
               "public\nx = low.public, low.__name__\n"
               "def _mine():\n    pass\n_mine()\n"
               "import os\nos._exit\n"),
        "low2": ("from tlhelpers import low2\n"
                 "x = low2._own  # its own private name\n"),
    }
    for name, text in sources.items():
        (tmp_path / f"{name}.py").write_text(text)
    (tmp_path / "__init__.py").write_text("")
    found = private_uses(tmp_path)
    assert found == [
        "a:1: imports _helper from low",
        "b:1: imports _helper from low",
        "c:3: uses low._helper",
        "d:3: uses low._helper",
        "d:3: uses low._helper",
        "e:1: imports _private_module from tlhelpers",
    ]
