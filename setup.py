"""Build script. A plain install is pure Python; with FASTFLOW_CUDA_ARCHS set (e.g. "80;90") and
nvcc on PATH, the CUDA kernels in csrc/ are compiled ahead of time into a fatbin shipped inside
the package, which the CUDA backend prefers to run-time compilation."""

from setuptools import setup

setup()
