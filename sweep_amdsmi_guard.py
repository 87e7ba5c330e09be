"""Hide a broken `amdsmi` install from every Python process of this environment.

zeus depends on `amdsmi`, whose import raises KeyError('libamd_smi.so') on machines
without ROCm; Ray's GPU detection imports it in every process (driver, dashboard,
workers) and then crashes at `ray.init`. A `.pth` file runs this module at interpreter
start, so an unloadable amdsmi reads as "not installed" to Ray and Zeus alike, which
both handle. On a ROCm machine the import succeeds and nothing changes.
"""

import contextlib
import importlib.util
import io
import sys


def _hide_broken_amdsmi() -> None:
    if "amdsmi" in sys.modules or importlib.util.find_spec("amdsmi") is None:
        return
    # amdsmi prints its own complaint on failure; keep interpreter start quiet.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            import amdsmi  # noqa: F401
            return
        except Exception:
            pass
    for name in [m for m in sys.modules if m == "amdsmi" or m.startswith("amdsmi.")]:
        del sys.modules[name]
    sys.modules["amdsmi"] = None  # makes `import amdsmi` raise ImportError


try:
    _hide_broken_amdsmi()
except Exception:  # a start-up hook must never break the interpreter
    pass
