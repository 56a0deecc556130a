"""Build script: compiles the Cython hot paths in csrc/ into geomx._kernels, geomx._compress and
geomx._delivery, and installs the start-up hook in startup/ at the top of site-packages.

Everything else about the package lives in pyproject.toml.
"""
import base64
import hashlib
import os
import zipfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

try:  # setuptools >= 64 builds `pip install -e` through this command (PEP 660)
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover - pyproject.toml requires a newer setuptools
    editable_wheel = None

# Built against numpy 2 (pyproject.toml), for numpy 1.23's C API: the extensions then import on numpy 1.23.5
# and later, 1.x and 2.x, so the core runs on both (MXNet's extra keeps numpy < 2 for MXNet).
NUMPY_MACROS = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), ("NPY_TARGET_VERSION", "NPY_1_23_API_VERSION")]

extensions = [
    Extension(
        "geomx._kernels",
        ["csrc/_kernels.pyx"],
        include_dirs=[np.get_include()],
        # No -march=native: the wheel must run on any x86-64; F16C is chosen at run time.
        extra_compile_args=["-O3"],
        define_macros=NUMPY_MACROS,
    ),
    Extension(
        "geomx._compress",
        ["csrc/_compress.pyx"],
        include_dirs=[np.get_include()],
        extra_compile_args=["-O3"],
        define_macros=NUMPY_MACROS,
    ),
    # C++ for the engine callback's types (dmlc::Error, std::mutex); no MXNet headers or library needed
    # at build time: libmxnet's entry points are looked up at run time (geomx/delivery.py). So it is built
    # everywhere, also where MXNet is not installed; only geomx.delivery (the MXNet front end) imports it.
    Extension(
        "geomx._delivery",
        ["csrc/_delivery.pyx"],
        language="c++",
        extra_compile_args=["-O2", "-std=c++11"],
    ),
]

# The numpy-alias hook (startup/_geomx_numpy_aliases.py says why): a .pth file that `site` runs at
# interpreter start and the module it imports. Both go to the top of site-packages, outside the geomx
# package: importing anything inside it runs geomx/__init__.py, which every interpreter would then pay for.
STARTUP_FILES = ["startup/geomx-numpy-aliases.pth", "startup/_geomx_numpy_aliases.py"]


class build_py_with_startup(build_py):
    """A normal wheel: the start-up files beside the packages, at the root of the wheel."""

    def run(self):
        super().run()
        for src in STARTUP_FILES:
            self.copy_file(src, os.path.join(self.build_lib, os.path.basename(src)))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, os.path.basename(src)) for src in STARTUP_FILES]


def _add_to_wheel(wheel_path, files):
    """Rewrite ``wheel_path`` with ``files`` added at its root and listed in its RECORD."""
    tmp = wheel_path + ".tmp"
    with zipfile.ZipFile(wheel_path) as old, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as new:
        record_name = next(n for n in old.namelist() if n.endswith(".dist-info/RECORD"))
        record = old.read(record_name).decode()
        for item in old.infolist():
            if item.filename != record_name:
                new.writestr(item, old.read(item.filename))
        for src in files:
            with open(src, "rb") as f:
                data = f.read()
            name = os.path.basename(src)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            new.writestr(name, data)
            record = record.rstrip("\n") + f"\n{name},sha256={digest},{len(data)}\n"
        new.writestr(record_name, record)
    os.replace(tmp, wheel_path)


cmdclass = {"build_py": build_py_with_startup}
if editable_wheel is not None:
    class editable_wheel_with_startup(editable_wheel):
        """`pip install -e`: the editable wheel holds only a path hook, so add the start-up files to it.
        (They are copies: an edit to them needs a reinstall, unlike the package itself.)"""

        def run(self):
            super().run()
            wheels = [n for n in os.listdir(self.dist_dir) if n.endswith(".whl") and ".editable-" in n]
            if len(wheels) != 1:
                raise RuntimeError(f"expected one editable wheel in {self.dist_dir}, found {wheels}")
            _add_to_wheel(os.path.join(self.dist_dir, wheels[0]), STARTUP_FILES)

    cmdclass["editable_wheel"] = editable_wheel_with_startup

setup(ext_modules=cythonize(extensions, language_level="3"), cmdclass=cmdclass)
