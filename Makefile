# Every target creates or reuses .venv in the repo root, so a fresh clone needs only `make demo` / `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEMO    := demo-out

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q

demo: $(STAMP)
	$(VPY) examples/digits_demo.py --out $(DEMO)

clean:
	rm -rf $(DEMO) .pytest_cache
