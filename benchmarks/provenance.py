"""Which code a benchmark row measured (the commit, for every CSV the benchmarks write), and
the CSV writer. Imports nothing heavy: CPU-only benchmarks must not import the kernels."""

from __future__ import annotations

import csv
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


def write_csv(path: pathlib.Path, columns: list[str], rows: list[list]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path
