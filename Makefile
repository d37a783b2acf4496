# The two commands of the README: `make demo` (install + train on Fashion-MNIST) and `make test`.
# Everything installs into a project virtual environment (.venv), so the same commands work
# where the system Python refuses `pip install` (PEP 668: stock Debian and Ubuntu).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install data browser demo test bench venv docs

# Debian and Ubuntu ship venv's pip bootstrap separately (python3-venv): installed when missing.
$(PY):
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q python3-venv || (apt-get update -q && apt-get install -y -q python3-venv)) >/dev/null; \
	  fi; $(PYTHON) -m venv $(VENV); }

venv: $(PY)

install: $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[all]"

# Debian ships Fashion-MNIST; elsewhere `resnetkit` downloads it with checksums on first use.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	else echo "no apt: Fashion-MNIST will be downloaded on first use"; fi

# The page test drives Debian's Chromium through Playwright (Playwright's own browser download
# is not used); without apt it is skipped with the reason.
browser:
	@if command -v chromium >/dev/null; then echo "Chromium: $$(command -v chromium)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)) >/dev/null; \
	else echo "no apt: the browser test of the serve page will be skipped"; fi

demo: install data
	$(VENV)/bin/resnetkit train --recipe fashion-mnist-quick

test: install data browser
	$(PY) -m pip install -q -e ".[all,paddle]"
	$(PY) -m pytest -q

# the docs site into site/ (the tutorial notebook executed as it is rendered)
docs: install data
	$(VENV)/bin/mkdocs build --strict

bench: install
	$(PY) benchmarks/trainer_overhead.py
