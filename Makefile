# Two entry points do all set-up on a fresh machine:
#   make serve   - serve the offline default model on http://127.0.0.1:8080
#   make test    - run the whole test suite
# Both create .venv/ first. Variables: PYTHON, TORCH_SPEC, ARGS (passed to serve).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: serve test venv java clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11+ needed"'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve can pull a multi-GB CUDA build on CPU machines.
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -q -e ".[serve,test]"
	touch $@

# TorchServe's frontend is Java 17+.
java:
	@java -version 2>&1 | grep -qE 'version "(1[7-9]|2[0-9])' || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless >/dev/null; \
	  else echo "TorchServe needs Java 17: install openjdk-17-jre-headless" >&2; exit 1; fi; }

serve: $(STAMP) java
	$(VENV)/bin/llava-sessions serve $(ARGS)

test: $(STAMP) java
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
