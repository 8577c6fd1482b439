# Two entry points do all the set-up on a fresh machine: `make reproduce` and `make test`.
# Each creates .venv and installs requirements.txt on first use; later runs reuse it.
PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED_DATA ?= ../shared/data

.PHONY: reproduce demo test bench data

$(VENV)/installed: requirements.txt
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

# Offline machines with a local copy of MNIST/FashionMNIST (this project's CI) link it in;
# everyone else gets torchvision's normal download on first use.
data:
	@mkdir -p data
	@for d in MNIST FashionMNIST; do \
	  if [ ! -e data/$$d ] && [ -d $(SHARED_DATA)/$$d ]; then ln -s "$$(cd $(SHARED_DATA)/$$d && pwd)" data/$$d; fi; \
	done

reproduce: $(VENV)/installed data
	$(PY) parity_mnist.py --reproduce

demo: $(VENV)/installed data
	$(PY) parity_mnist.py --method rl

bench: $(VENV)/installed data
	$(PY) parity_mnist.py --bench

test: $(VENV)/installed data
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q
