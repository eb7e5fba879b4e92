# Fresh-machine entry points (see README): `make demo` and `make test` install everything they need first.
PYTHON ?= python3
# CPU machines: the local CPU wheel. GPU machines: `make install TORCH=torch` (or a CUDA-specific wheel).
TORCH ?= torch==2.13.0
DEMO_OUT ?= demo_out

.PHONY: install test demo lint

install: .medssl_install.stamp

.medssl_install.stamp: pyproject.toml
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[dev]"
	touch $@

test: install
	$(PYTHON) -m pytest -n 2 -q -p no:cacheprovider

demo: install
	$(PYTHON) -m medssl demo --out $(DEMO_OUT)

lint: install
	$(PYTHON) -m ruff check medssl tests benchmarks studies
