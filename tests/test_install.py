"""What installing geomx puts in place: the numpy-alias hook that lets MXNet 1.9.1 import on numpy >= 1.24
(so on Python 3.12), and the console scripts (``--version``, ``geomx-node --help``).

Each check runs the installed interpreter or script in a subprocess, as a user would."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from geomx import __version__, config
from geomx import node as node_cli
from geomx.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ALIASES = ("bool", "int", "float", "complex", "object", "str")


def _python(code: str, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMLC_", "GEOMX_"))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=str(ROOT / "tests"), **kw)


@pytest.mark.system
def test_alias_hook_is_installed_and_costs_no_import_at_start():
    out = _python("import sys, os\n"
                  "hook = sys.modules.get('_geomx_numpy_aliases')\n"
                  "print(hook is not None, 'numpy' in sys.modules, type(sys.meta_path[0]).__name__)\n"
                  "print(os.path.dirname(hook.__file__))")
    assert out.returncode == 0, out.stderr
    first, where = out.stdout.splitlines()
    # Loaded at interpreter start by the .pth beside it in site-packages; numpy not imported yet.
    assert first == "True False _BeforeMXNet"
    assert (Path(where) / "geomx-numpy-aliases.pth").read_text().strip() == "import _geomx_numpy_aliases"


# numpy >= 1.24 lacks the aliases; on an older numpy (1.23.5, Python <= 3.11) the script takes them away
# the way 1.24 did, so that both cases are the one 3.12 has. Without the hook MXNet must fail to import:
# that shows the test sees the case the hook exists for.
_REMOVE_ALIASES = f"""
import numpy
for name in {ALIASES!r}:
    numpy.__dict__.pop(name, None)
    getattr(numpy, "__deprecated_attrs__", {{}}).pop(name, None)
assert not any(hasattr(numpy, name) for name in {ALIASES!r})
"""


@pytest.mark.system
@pytest.mark.parametrize("hooked", [True, False])
def test_mxnet_imports_on_a_numpy_without_the_aliases(hooked):
    code = _REMOVE_ALIASES
    if not hooked:
        code += "import _geomx_numpy_aliases\n_geomx_numpy_aliases.uninstall()\n"
    code += ("import mxnet as mx\n"
             "import builtins\n"
             f"print(sorted(n for n in {ALIASES!r} if getattr(numpy, n) is getattr(builtins, n)))\n"
             "print(mx.nd.array([1, 2, 3]).sum().asscalar())\n")
    out = _python(code)
    if hooked:
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.splitlines() == [str(sorted(ALIASES)), "6.0"]
    else:
        assert out.returncode != 0
        assert re.search(r"AttributeError: module 'numpy' has no attribute '(bool|int|float|complex|object|str)'",
                         out.stderr), out.stderr[-3000:]


@pytest.mark.system
def test_alias_hook_leaves_names_numpy_has():
    # Nothing to restore: the pinned numpy of Python <= 3.11 still has all six (deprecated), numpy 1.26
    # none. Either way the hook sets exactly the names numpy lacked, to the builtins.
    out = _python("import warnings, numpy, builtins, _geomx_numpy_aliases as h\n"
                  "with warnings.catch_warnings():\n"
                  "    warnings.simplefilter('ignore')\n"
                  f"    had = [n for n in {ALIASES!r} if hasattr(numpy, n)]\n"
                  "    numpy.float = 'kept'\n"
                  "added = h.restore()\n"
                  f"print(sorted(added) == sorted(set({ALIASES!r}) - set(had) - {{'float'}}), numpy.float)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "kept"]


SCRIPTS = ("geomx-launch", "geomx-node", "geomx-keys", "geomx-p3-merge")


@pytest.mark.system
@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_version(script):
    out = subprocess.run([str(BIN / script), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{script} {__version__}"


@pytest.mark.system
def test_geomx_node_help_names_roles_variables_and_the_docs():
    out = subprocess.run([str(BIN / "geomx-node"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "docs/Configurations.md" in text
    for name, variables in node_cli.ROLE_VARIABLES:
        assert f"{name:<17} {variables}" in text
    # Every variable the help names is one config.py reads and docs/Configurations.md documents.
    config_src = (ROOT / "geomx" / "config.py").read_text()
    docs = (ROOT / "docs" / "Configurations.md").read_text()
    named = set(re.findall(r"\b(?:DMLC|PS|GEOMX|MXNET)_[A-Z0-9_]+", text))
    assert len(named) >= 15
    for var in sorted(named):
        assert f'"{var}"' in config_src, var
        assert f"`{var}`" in docs, var


@pytest.mark.system
def test_geomx_node_refuses_arguments():
    out = subprocess.run([str(BIN / "geomx-node"), "--role", "server"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unrecognized arguments: --role server" in out.stderr


_VALUES = {"URI": "127.0.0.1", "PORT": "9000"}


def _env_for(role_name: str, required) -> dict:
    env = dict(v.split("=", 1) for v in dict(node_cli.ROLE_VARIABLES)[role_name].split())
    for var in required:
        env[var] = next((v for suffix, v in _VALUES.items() if var.endswith(suffix)), "1")
    return env


@pytest.mark.unit
@pytest.mark.parametrize("role_name", [name for name, _ in node_cli.ROLE_VARIABLES])
def test_geomx_node_help_lists_exactly_the_required_variables(role_name):
    """What --help calls required is what config.load() requires: with all of them a role loads, and
    without any one of them it is refused, naming that variable."""
    required = node_cli.REQUIRED_VARIABLES[role_name]
    cfg = config.load(_env_for(role_name, required))
    assert cfg.role == {"global scheduler": config.GLOBAL_SCHEDULER, "global server": config.GLOBAL_SERVER,
                        "party scheduler": config.SCHEDULER, "local server": config.LOCAL_SERVER}[role_name]
    for var in required:
        env = _env_for(role_name, required)
        del env[var]
        with pytest.raises(ConfigError, match=f"^{var} is required but not set"):
            config.load(env)
