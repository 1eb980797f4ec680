"""`import datamodules` never reaches the network (issue 22): albumentations' update check is off."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Every opener albumentations' version check builds is counted and refused (it catches the error).
PROBE = """
import os, urllib.request
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("offline")
urllib.request.build_opener = refuse
import {module}
print("NO_ALBUMENTATIONS_UPDATE=" + os.environ["NO_ALBUMENTATIONS_UPDATE"])
print(f"network attempts: {{len(attempts)}}")
"""


def run_probe(module="datamodules", **env):
    environment = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_importing_datamodules_does_not_check_for_updates():
    done = run_probe()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NO_ALBUMENTATIONS_UPDATE=1" in done.stdout and "network attempts: 0" in done.stdout
    # The probe sees the check when it runs: albumentations alone, asked to check.
    asked = run_probe("albumentations", NO_ALBUMENTATIONS_UPDATE="0")
    assert "NO_ALBUMENTATIONS_UPDATE=0" in asked.stdout and "network attempts: 1" in asked.stdout
