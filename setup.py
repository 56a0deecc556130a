"""Build script: compiles the Cython hot paths in csrc/ into geomx._kernels,
geomx._compress and geomx._delivery.

Everything else about the package lives in pyproject.toml.
"""
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "geomx._kernels",
        ["csrc/_kernels.pyx"],
        include_dirs=[np.get_include()],
        # No -march=native: the wheel must run on any x86-64; F16C is chosen at run time.
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
    Extension(
        "geomx._compress",
        ["csrc/_compress.pyx"],
        include_dirs=[np.get_include()],
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    ),
    # C++ for the engine callback's types (dmlc::Error, std::mutex); no MXNet headers or library needed
    # at build time: libmxnet's entry points are looked up at run time (geomx/delivery.py).
    Extension(
        "geomx._delivery",
        ["csrc/_delivery.pyx"],
        language="c++",
        extra_compile_args=["-O2", "-std=c++11"],
    ),
]

setup(ext_modules=cythonize(extensions, language_level="3"))
