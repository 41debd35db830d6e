"""tools/system-deps.sh — what `make repro`/`make test` run first: installed packages pass silently; a missing one
that cannot be installed (not root, no passwordless sudo) stops with one line naming the exact command."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "system-deps.sh"


def _as_unprivileged(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    if shutil.which("su") is None:
        pytest.skip("needs su to drop root")
    return ["su", "nobody", "-s", "/bin/bash", "-c", " ".join(args)]


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="a Debian/Ubuntu system")
def test_installed_packages_pass_silently():
    proc = subprocess.run([str(SCRIPT), "coreutils"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == proc.stderr == ""


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="a Debian/Ubuntu system")
def test_missing_package_without_privileges_names_the_command():
    proc = subprocess.run(_as_unprivileged([str(SCRIPT), "coreutils", "no-such-package-xyz"]), capture_output=True,
                          text=True, timeout=60, cwd="/")
    if "installing system packages" in proc.stderr:
        pytest.skip("this user has passwordless sudo")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: missing system packages: no-such-package-xyz; run: sudo apt-get install -y --no-install-recommends "
        "no-such-package-xyz"]
