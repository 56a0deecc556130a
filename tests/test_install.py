"""What installing geomx puts in place: its requirements (the core needs no framework; the ``mxnet`` and
``torch`` extras bring one), the numpy-alias hook that lets MXNet 1.9.1 import on numpy >= 1.24 (so on
Python 3.12), and the console scripts (``--version``, ``geomx-node --help``).

The requirements are read from the installed distribution's metadata; every other check runs the installed
interpreter or script in a subprocess, as a user would. The checks that import MXNet are skipped where it is
not installed (the core alone, e.g. on Python 3.13)."""
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement  # pytest's own dependency
from packaging.specifiers import SpecifierSet

from geomx import __version__, config
from geomx import node as node_cli
from geomx.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ALIASES = ("bool", "int", "float", "complex", "object", "str")
HAS_MXNET = importlib.util.find_spec("mxnet") is not None
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")


def _python(code: str, env=None, **kw) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, with ``env`` added to this one's environment (less geomx's variables)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DMLC_", "GEOMX_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=full_env, cwd=str(ROOT / "tests"), **kw)


def _declared(python: str, extra: str = "") -> dict:
    """``{name: specifier}`` of the installed geomx's requirements on Python ``python``: the core's (no
    ``extra``), or those that ``extra`` adds to the core's."""
    def applies(req: Requirement, extra: str) -> bool:
        return req.marker is None or req.marker.evaluate({"python_version": python, "extra": extra})

    # Run from the repository root, the source tree's geomx.egg-info (written by the last build here, whichever
    # environment it was for) comes first on sys.path: read the installed distribution's metadata instead.
    installed = [d for d in importlib.metadata.distributions(name="geomx") if Path(d.locate_file("")).resolve() != ROOT]
    assert installed, "geomx is not installed"
    found = {}
    for req in map(Requirement, installed[0].requires or []):
        if applies(req, extra) and not (extra and applies(req, "")):
            assert req.name not in found, f"{req.name} required twice on Python {python} ({extra or 'core'})"
            found[req.name] = str(req.specifier)
    return found


# The metadata is written at install time: after a change to pyproject.toml's dependencies, reinstall.
_STALE = "(an install older than pyproject.toml? `make setup` or `pip install -e .` reinstalls)"


def _version_tuple(python: str) -> tuple:
    return tuple(int(part) for part in python.split("."))


@pytest.mark.unit
@pytest.mark.parametrize("python", PYTHONS)
def test_the_core_requires_numpy_and_pyzmq_only(python):
    """``pip install geomx``: no framework, and numpy 1.x or 2.x (the extensions are built against numpy 2 for
    numpy 1.23's C API: pyproject.toml's build-system), from the first numpy with wheels for that Python."""
    core = _declared(python)
    expected = {"numpy", "pyzmq"} | ({"tomli"} if _version_tuple(python) < (3, 11) else set())
    assert set(core) == expected, f"{core} {_STALE}"
    assert "2.4.0" in SpecifierSet(core["numpy"]), core["numpy"]
    oldest = "1.23.5" if _version_tuple(python) < (3, 12) else "1.26.4" if _version_tuple(python) < (3, 13) else "2.1.0"
    assert oldest in SpecifierSet(core["numpy"]), core["numpy"]


@pytest.mark.unit
@pytest.mark.parametrize("python", PYTHONS)
def test_the_mxnet_extra_brings_mxnet_with_numpy_below_2_up_to_python_3_12(python):
    extra = _declared(python, "mxnet")
    if _version_tuple(python) >= (3, 13):  # MXNet 1.9.1 stops at 3.12: the extra adds nothing there
        assert extra == {}, f"{extra} {_STALE}"
        return
    assert extra.get("mxnet") == "==1.9.1", f"{extra} {_STALE}"
    assert "1.26.4" in SpecifierSet(extra["numpy"]) and "2.0.0" not in SpecifierSet(extra["numpy"]), extra
    # MXNet imports distutils, which setuptools provides again from 3.12 on
    assert ("setuptools" in extra) == (python == "3.12"), extra
    assert set(extra) <= {"mxnet", "numpy", "setuptools"}, extra


@pytest.mark.unit
@pytest.mark.parametrize("python", PYTHONS)
def test_the_torch_extra_brings_torch(python):
    assert _declared(python, "torch") == {"torch": ">=2.1"}, _STALE


@pytest.mark.system
@pytest.mark.parametrize("role", ["", "worker"])
def test_import_geomx_imports_no_framework(role):
    """``import geomx`` (in a worker process too) loads neither MXNet nor PyTorch: the core runs without them."""
    env = {"DMLC_ROLE": role} if role else {}
    out = _python("import sys, geomx\nprint(sorted(m for m in ('mxnet', 'torch') if m in sys.modules))", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.system
def test_the_runtime_imports_no_test_harness():
    """``import geomx`` (and the node and launcher entry points) never loads ``geomx.testing``, the emulated
    WAN harness: the launcher imports it only for ``--wan``. Importing the harness itself does load it,
    which shows the check sees the module when it is there."""
    probe = "print('geomx.testing' in sys.modules, 'geomx.testing.wan' in sys.modules)"
    out = _python(f"import sys, geomx, geomx.node, geomx.launch.cli\n{probe}\n"
                  f"import geomx.testing.wan\n{probe}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["False False", "True True"]


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
@pytest.mark.skipif(not HAS_MXNET, reason="MXNet is not installed (pip install 'geomx[mxnet]', Python <= 3.12)")
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


SCRIPTS = ("geomx-launch", "geomx-node", "geomx-keys", "geomx-trace", "geomx-p3-merge")


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
