# Two entry points for a fresh machine: `make run` and `make test`. Each builds .venv when missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.physkern-installed
PIP    := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: run test install bench clean

$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0 setuptools wheel ninja
	$(PIP) --no-build-isolation -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Quantize the packaged default model and print perplexity and true bits/weight.
run: $(STAMP)
	$(VENV)/bin/physkern run

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# CPU microbenchmarks; each writes JSON (with device and versions) into bench/results/.
bench: $(STAMP)
	$(PY) bench/bench_histogram.py
	$(PY) bench/bench_kernels.py
	$(PY) bench/bench_lattice_attention.py

clean:
	rm -rf build *.egg-info physkern/_C*.so
