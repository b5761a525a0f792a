"""Only the optional C extension lives here (everything else is in pyproject.toml): runtime._native, the runtime's
per-request arithmetic (runtime/_native.c). optional=True: without a C compiler pip still installs fewstep, and the
runtime does the same work in numpy."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "runtime._native", ["runtime/_native.c"], optional=True,
    # no fused multiply-adds: x0 and uint8 must round exactly as numpy's separate operations do
    extra_compile_args=["-O2", "-ffp-contract=off"],
)])
