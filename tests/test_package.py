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


# Run from the repository root, where `kernels/` is also found as top-level `kernels`:
# transformers imports that name to read the version of Hugging Face's kernel library.
ROOT_PROBE = (
    "import json, os, sys, transformers.integrations.hub_kernels, kernels;"
    "from transformers.utils import is_kernels_available;"
    "names = sorted(n for n in vars(kernels) if not n.startswith('__'));"
    "interpreter = os.environ.get('TRITON_INTERPRET');"
    "import mole_serve.kernels;"
    "print(json.dumps([is_kernels_available(), names, interpreter,"
    "                  sorted(m for m in sys.modules if m.startswith('kernels.'))]))"
)


def test_kernels_found_as_top_level_kernels_define_nothing():
    """Under that name the package must not register the custom ops (the first registration
    wins: `mole_serve.kernels` would run the other copy's code) nor turn on Triton's
    interpreter in a CPU process."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", ROOT_PROBE], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    import json
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [False, [], None, []]


def test_vllm_plugin_entry_point_is_registered():
    points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "mole_serve.plugin:register" in {p.value for p in points if p.name == "mole_serve"}
