# The two quickstart commands (`make demo`, `make test`) and their building blocks. See README.md.
# Each target creates the virtual environment on first use, so a fresh clone needs nothing else.

VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch is installed first and pinned together: torchvision must match the torch build exactly.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# The JPEG copy of CIFAR-10 where it is present (offline machines), else torchvision's official download.
DATA ?= $(if $(wildcard ../shared/data/cifar10-jpeg.tar.gz),../shared/data/cifar10-jpeg.tar.gz,cifar10)
RUN ?= runs/quick
PACKAGE ?= packages/quick
PORT ?= 3000

.PHONY: setup demo train export serve test lint container-check protos

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $@

# The main job: train the quick recipe, export a verified package, serve it on http://127.0.0.1:$(PORT).
# Each step runs only when its output is missing, so a second `make demo` goes straight to serving.
demo: export serve

train: $(RUN)/metrics.json

# metrics.json is written when the last epoch ends; a run interrupted before that is resumed.
$(RUN)/metrics.json: | setup
	$(PY) -m training train --recipe quick --data $(DATA) --out $(RUN) $(if $(wildcard $(RUN)/checkpoint.pt),--resume)

export: $(PACKAGE)/manifest.json

$(PACKAGE)/manifest.json: $(RUN)/metrics.json
	$(PY) -m export --run $(RUN) --out $(PACKAGE) --overwrite --name visionserve-classifier

# The ports are checked first: a second `bentoml serve` empties the running server's metrics before its own check.
serve: setup
	$(PY) -m service.listening --port $(PORT)
	VISIONSERVE_MODEL=$(PACKAGE) $(VENV)/bin/bentoml serve --port $(PORT)

test: setup
	$(PY) -m pytest -m "not gpu"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Builds the GPU and CPU images, runs and probes each (docs/deployment.md); needs root for the Docker engine.
container-check: export
	$(PY) -m deploy.check --package $(PACKAGE)

# Regenerates the gRPC modules (service/protos/) after an edit of service/protos/grpc_service.proto.
protos: setup
	$(PY) -m service.protos.generate
