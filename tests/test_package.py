"""Packaging: `kernels/` and `training/` import as mole_serve.kernels / mole_serve.training
and never as top-level `kernels` (Hugging Face's kernel-hub package, which transformers
probes for), both from the editable install and from a regular `pip install .`."""

import importlib.metadata
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

PROBE = (
    "import importlib.util, json, mole_serve.kernels as k, mole_serve.training as t;"
    "s = importlib.util.find_spec('kernels');"
    "print(json.dumps([k.__file__, t.__file__, s.origin if s else None]))"
)


def probe(cwd: pathlib.Path, env: dict | None = None) -> list:
    import json
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_editable_install_maps_the_subpackages(tmp_path):
    kernels_file, training_file, top_level = probe(tmp_path)
    assert pathlib.Path(kernels_file).parent == REPO / "kernels"
    assert pathlib.Path(training_file).parent == REPO / "training"
    assert top_level is None or not top_level.startswith(str(REPO))


def test_regular_install_maps_the_subpackages(tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "--target", str(target), str(REPO)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (target / "kernels").exists() and not (target / "training").exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    kernels_file, training_file, top_level = probe(tmp_path, env)
    assert pathlib.Path(kernels_file).parent == target / "mole_serve" / "kernels"
    assert pathlib.Path(training_file).parent == target / "mole_serve" / "training"
    assert top_level is None or not top_level.startswith((str(REPO), str(target)))


def test_vllm_plugin_entry_point_is_registered():
    points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "mole_serve.plugin:register" in {p.value for p in points if p.name == "mole_serve"}
