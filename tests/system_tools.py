"""Programs from Debian's packages that some tests drive: Chromium (``chat --web`` in a real
browser) and Go (Ollama's ``text/template``). Installed with apt-get on first use when the tests
run as root on Debian, as the real models are fetched with pip; elsewhere the caller skips,
saying what to install."""

from __future__ import annotations

import os
import shutil
import subprocess


class Unavailable(Exception):
    """The program is missing and could not be installed: the caller skips, saying why."""


def debian_tool(command: str, package: str) -> str:
    """The path of ``command``, installing Debian's ``package`` if it is missing."""
    if found := shutil.which(command):
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise Unavailable(f"needs {command} (Debian: apt-get install {package})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:  # stale package lists: refresh them once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if found := shutil.which(command):
        return found
    reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
    raise Unavailable(f"apt-get could not install {package} for {command}: {reason}")
