"""The compiled per-request arithmetic (runtime/_native.c), or None where it was not built.

pip builds `runtime._native` when a C compiler is present (setup.py); without one, or with FEWSTEP_NATIVE=0 in the
environment, the runtime does the same work in numpy. x0 and uint8 are bit-identical either way; noise may differ
in the last float32 bit (another libm), within the engine spec's 1e-6.
"""

import os

lib = None
if os.environ.get("FEWSTEP_NATIVE", "1") != "0":
    try:
        from . import _native as lib
    except ImportError:
        lib = None
