"""Restore the numpy aliases MXNet 1.9.1 still uses, just before MXNet is first imported.

MXNet 1.9.1 refers to ``np.bool``, ``np.int``, ``np.float``, ``np.complex``, ``np.object`` and
``np.str``, which numpy 1.24 removed (they were the Python builtins under other names). numpy 1.23.5,
the last release that has them, has no wheels for Python 3.12, so geomx supports numpy < 2 and puts the
missing names back. It must happen before MXNet's first import, wherever that is: in a training script
that runs ``import mxnet`` before ``import geomx`` too. That is why this module is installed at the top
of site-packages next to ``geomx-numpy-aliases.pth``, whose one ``import`` line Python's ``site`` module
runs at every interpreter start in that environment (see "Python 3.12 and numpy" in README.md).

At start-up it only puts a finder in front of ``sys.meta_path`` (no numpy import, so interpreters that
never import MXNet pay nothing measurable). The first ``import mxnet`` asks the finder, which then
imports numpy, sets each alias that numpy lacks to the builtin it stood for, removes itself and lets the
normal import go on. Names numpy still has are left alone (numpy 1.23.5 has all six), so on the pinned
numpy this changes nothing.

This module must not import geomx: every interpreter would then pay for ``import geomx`` at start.
"""
import sys

# The builtins these names were aliases of, until numpy 1.24 removed them.
ALIASES = {"bool": bool, "int": int, "float": float, "complex": complex, "object": object, "str": str}


def restore() -> list:
    """Set each alias numpy lacks; return the names set (empty on numpy <= 1.23 or if numpy is absent)."""
    try:
        import numpy
    except ImportError:
        return []  # MXNet's own import then fails with the clearer message
    import warnings

    added = []
    with warnings.catch_warnings():
        # numpy 1.20-1.23 still has the names, with a DeprecationWarning on every access.
        warnings.simplefilter("ignore")
        for name, builtin in ALIASES.items():
            if not hasattr(numpy, name):
                setattr(numpy, name, builtin)
                added.append(name)
    return added


class _BeforeMXNet:
    """A meta-path finder that finds nothing: it only runs :func:`restore` when ``mxnet`` is imported."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib's signature
        if fullname == "mxnet":
            uninstall()
            restore()
        return None  # the normal finders import mxnet itself


def install() -> None:
    """Arrange for :func:`restore` to run just before the first ``import mxnet`` (or now, if too late)."""
    if "mxnet" in sys.modules:
        restore()
        return
    if not any(isinstance(f, _BeforeMXNet) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMXNet())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _BeforeMXNet)]


install()
