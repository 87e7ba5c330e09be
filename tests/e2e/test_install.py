"""A normal install must give an environment where Ray starts, even with a broken amdsmi."""

from importlib import metadata
import subprocess
import sys

import pytest


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed("amdsmi"), reason="amdsmi is not installed here")
def test_unloadable_amdsmi_reads_as_absent():
    proc = _python("import amdsmi")
    # without ROCm: ImportError (treated as 'no AMD GPU' by Ray and Zeus), never KeyError
    assert proc.returncode == 0 or "ImportError" in proc.stderr or "ModuleNotFoundError" in proc.stderr, proc.stderr
    assert "KeyError" not in proc.stderr


def test_ray_init_works_in_this_environment():
    proc = _python("import ray; ray.init(num_cpus=1, include_dashboard=False); "
                   "print(ray.cluster_resources()['CPU']); ray.shutdown()")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("1.0")


def test_zeus_monitor_imports():
    proc = _python("from zeus.monitor import ZeusMonitor; m = ZeusMonitor(cpu_indices=[]); print(len(m.gpu_indices))")
    assert proc.returncode == 0, proc.stderr[-2000:]
