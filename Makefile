# Two entry points for a fresh machine: `make run` and `make test`. Each builds .venv when missing,
# installing exactly the versions in requirements.lock (refresh it with `make lock`).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.physkern-installed
LOCK   := requirements.lock
PIP    := $(PY) -m pip install -q --disable-pip-version-check -c $(LOCK)

.PHONY: run test install lock bench clean

$(STAMP): pyproject.toml setup.py $(LOCK) $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch setuptools wheel ninja
	$(PIP) --no-build-isolation -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Re-resolve pyproject.toml's ranges into requirements.lock (review the diff, then make test).
lock:
	bash tools/refresh_lock.sh

# Quantize the packaged default model and print perplexity and true bits/weight.
run: $(STAMP)
	$(VENV)/bin/physkern run

# -P: the repository root is not put on sys.path, so tests import the installed physkern the
# way a user does (kernels/__init__.py also guards the root case; tests/test_install.py checks it).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -P -m pytest -q tests

# CPU microbenchmarks; each writes JSON (with device and versions) into bench/results/.
bench: $(STAMP)
	$(PY) bench/bench_histogram.py
	$(PY) bench/bench_kernels.py
	$(PY) bench/bench_lattice_attention.py

clean:
	rm -rf build *.egg-info physkern/_C*.so
