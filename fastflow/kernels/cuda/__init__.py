"""CUDA C++ kernels from ``csrc/``, loaded through CuPy (ahead-of-time fatbin or NVRTC); see
:mod:`fastflow.kernels.cuda.loader`. Importing this package needs neither CuPy nor a GPU."""
