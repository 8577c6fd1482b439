# Two entry points do all the set-up on a fresh machine: `make reproduce` (ParityMNIST, every figure on a
# reduced grid, minutes) and `make test`. `make reproduce-full` runs the paper's whole grid.
# Each creates .venv on first use and installs what it needs (the lab: requirements.txt; the tests: every
# requirements file); later runs reuse it.
PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED_DATA ?= ../shared/data

.PHONY: reproduce reproduce-full demo test bench llm-twin data vulkan notebook mutations

$(VENV)/installed: requirements.txt
	$(PYTHON_SYSTEM) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

# The tests cover every script: the LLM and robot paths' extra packages too.
$(VENV)/installed-all: $(VENV)/installed requirements-llm.txt requirements-vla.txt
	$(VENV)/bin/pip install -r requirements-llm.txt -r requirements-vla.txt
	touch $@

# Offline machines with a local copy of MNIST/FashionMNIST (this project's CI) link it in;
# everyone else gets torchvision's normal download on first use.
data:
	@mkdir -p data
	@for d in MNIST FashionMNIST; do \
	  if [ ! -e data/$$d ] && [ -d $(SHARED_DATA)/$$d ]; then ln -s "$$(cd $(SHARED_DATA)/$$d && pwd)" data/$$d; fi; \
	done

reproduce: $(VENV)/installed data
	$(PY) parity_sweep.py --quick

reproduce-full: $(VENV)/installed data
	$(PY) parity_sweep.py --reproduce

demo: $(VENV)/installed data
	$(PY) parity_mnist.py --method rl

# lab.ipynb is generated from docs/lab.md, the one source of the handout (test_lab.py checks they agree).
notebook: $(VENV)/installed
	$(VENV)/bin/jupytext --to ipynb -o lab.ipynb docs/lab.md

# One-line mistakes in the experiment scripts, each run against the tests that guard it (minutes).
mutations: $(VENV)/installed-all data
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) .ci/mutate.py

bench: $(VENV)/installed-all data
	$(PY) parity_sweep.py --bench
	HF_HUB_OFFLINE=1 $(PY) llm_finetune.py --bench

# The LLM CPU twin end to end (docs/llm_finetune.md): build + pretrain, the twin study, the plots.
llm-twin: $(VENV)/installed-all
	export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1; \
	$(PY) llm_finetune.py --build-twin && \
	for seed in 0 1; do S="--steps 96 --lr 3e-4 1e-3 --seed $$seed --out runs/llm-study"; \
	  $(PY) llm_finetune.py --method grpo sft self-sft grpo-kl reinforce simpo $$S --save-models final && \
	  $(PY) llm_finetune.py --method sft-distill $$S --teacher runs/llm-study/models/addition-*-grpo-lr0.0003-schedulerconstant-seed0-mu1-epochs1/step-96 \
	  || exit 1; done && \
	$(PY) llm_finetune.py --plot --out runs/llm-study

# ManiSkill's CPU renderer (vla_finetune.py) needs a Vulkan driver. On Debian 12 without a GPU, Mesa's
# lavapipe from bookworm-backports (25.x) works and the stock 22.3 does not: as root, install it once.
# Elsewhere this does nothing, and the ManiSkill test skips with the reason (docs/vla_finetune.md).
vulkan:
	@if [ "$$(id -u)" = 0 ] && grep -q bookworm /etc/os-release 2>/dev/null \
	    && ! dpkg-query -W -f='$${Version}' mesa-vulkan-drivers 2>/dev/null | grep -q '^2[5-9]'; then \
	  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
	    > /etc/apt/sources.list.d/bookworm-backports.sources; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1; \
	fi

test: $(VENV)/installed-all data vulkan
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q
