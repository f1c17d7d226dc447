"""Which code a benchmark row measured: the commit, for every CSV the benchmarks write."""

from __future__ import annotations

import os
import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent


def commit() -> str:
    """`$MOLE_SERVE_COMMIT` when set (a checkout sent to the GPU host has no .git), else the
    short HEAD, with "-dirty" when tracked files differ from it; "unknown" without git."""
    if os.environ.get("MOLE_SERVE_COMMIT"):
        return os.environ["MOLE_SERVE_COMMIT"]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip()
        except OSError:
            return ""
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
