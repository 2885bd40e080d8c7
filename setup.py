"""Build script. Metadata lives in pyproject.toml.

The package is pure Python today; the native kernels of csrc/ (a pybind11 extension that
does not link libtorch, plus CUDA sources built when nvcc is present) are added here by
the native-kernels issue.
"""

from setuptools import setup

setup()
