# The two commands of the README: `make demo` (install + train on Fashion-MNIST) and `make test`.
PY ?= python3
PIP := $(PY) -m pip
TORCH ?= torch==2.13.0

.PHONY: install data demo test bench

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[all]"

# Debian ships Fashion-MNIST; elsewhere `resnetkit` downloads it with checksums on first use.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	else echo "no apt: Fashion-MNIST will be downloaded on first use"; fi

demo: install data
	resnetkit train --recipe fashion-mnist-quick

test: install data
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/trainer_overhead.py
