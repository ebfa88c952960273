"""Runs tests/multidevice (sharded models on 8 virtual CPU devices) in a subprocess: jax fixes
the device count at start-up, and the rest of the suite keeps one device."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sharded_models_on_8_virtual_devices():
    env = {**os.environ, "MOEX_MULTIDEVICE": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/multidevice"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    report = "\n".join(line for line in proc.stdout.splitlines()
                       if "spmd_partitioner" not in line)
    assert proc.returncode == 0, f"tests/multidevice failed:\n{report[-20000:]}\n{proc.stderr[-5000:]}"
    assert " passed" in report and "failed" not in report, report[-3000:]
