# lightning-dq: every target is one command; `make` alone lists them.
#   make train-imagenet64 GPUS=8 ARGS="--trainer.max_epochs=50"
.DEFAULT_GOAL := help
SHELL := /bin/bash
PY := .venv/bin/python
CLI := .venv/bin/lightning-dq
GPUS ?= 1
ARGS ?=
DATA_ROOT ?=
CACHE_DIR ?=
AE_CKPT ?=
PRIOR_CKPT ?=
CONFIG ?= demo
OUT ?=
IMAGES ?=
FILE ?=
BASE := --config configs/base.yaml
ROOT := $(if $(DATA_ROOT),--data.init_args.root=$(DATA_ROOT),)
ROOT += $(if $(CACHE_DIR),--data.init_args.cache_dir=$(CACHE_DIR),)
AE := $(if $(AE_CKPT),--model.init_args.autoencoder_ckpt=$(AE_CKPT),)
DDP := $(if $(filter-out 0 1,$(GPUS)),--config configs/ddp.yaml --trainer.devices=$(GPUS),)

.PHONY: help install test test-all lint format demo demo-prior debug train-cifar10 train-imagenet32 train-imagenet64 \
        train-prior-cifar10 train-prior-imagenet32 train-prior-imagenet64 evaluate sample encode compress decompress bench tables clean

help:  ## list the targets (colour only on a terminal)
	@if [ -t 1 ]; then on='\033[36m'; off='\033[0m'; else on=; off=; fi; \
	grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | \
	awk -F':.*## ' -v on="$$on" -v off="$$off" '{printf "  %s%-24s%s %s\n", on, $$1, off, $$2}'

install:  ## create .venv and install lightning-dq with its dev extras (from nothing)
	python3 -m venv .venv && $(PY) -m pip install --upgrade pip && $(PY) -m pip install -e '.[dev]'

test:  ## run the fast CPU test suite (no slow or gpu tests)
	$(PY) -m pytest -m "not slow and not gpu" -n 2 --dist loadgroup $(ARGS)

test-all:  ## run every CPU test, slow ones included
	$(PY) -m pytest -m "not gpu" -n 2 --dist loadgroup $(ARGS)

lint:  ## ruff check and ruff format --check (what CI's test_package checks)
	$(PY) -m ruff check lightning_dq tests benchmarks experiments && \
	$(PY) -m ruff format --check lightning_dq tests benchmarks experiments

format:  ## ruff format and the fixable ruff checks over package, tests, benchmarks and experiments
	$(PY) -m ruff format lightning_dq tests benchmarks experiments && \
	$(PY) -m ruff check --fix lightning_dq tests benchmarks experiments

demo:  ## train a small DQ auto-encoder on real images for a few minutes on CPU (DATA_ROOT=data/)
	$(CLI) fit $(BASE) --config configs/demo.yaml $(ROOT) $(ARGS)

demo-prior:  ## after `make demo`: a small code prior, then figures A, B, C on the whole test split (DATA_ROOT as demo)
	$(CLI) fit $(BASE) --config configs/demo.yaml --config configs/prior_demo.yaml $(ROOT) $(AE) $(ARGS) && \
	$(CLI) test $(BASE) --config configs/demo.yaml --config configs/prior_demo.yaml $(ROOT) $(AE) --ckpt_path=last $(ARGS)

debug:  ## a seconds-long smoke run on synthetic data
	$(CLI) fit $(BASE) --config configs/debug.yaml $(ARGS)

.PHONY: prepare-imagenet32 prepare-imagenet64
prepare-imagenet32:  ## convert ImageNet-32 npz files under DATA_ROOT to the memory-mapped cache (once; CACHE_DIR= optional)
	$(CLI) prepare --dataset imagenet32 --root $(or $(DATA_ROOT),data/) $(if $(CACHE_DIR),--cache_dir $(CACHE_DIR),)

prepare-imagenet64:  ## the same for ImageNet-64 (about 16 GB written): run it before any multi-GPU training
	$(CLI) prepare --dataset imagenet64 --root $(or $(DATA_ROOT),data/) $(if $(CACHE_DIR),--cache_dir $(CACHE_DIR),)

train-cifar10:  ## train the auto-encoder on CIFAR-10 (GPUS=N for DDP, ARGS= for overrides)
	$(CLI) fit $(BASE) --config configs/cifar10.yaml $(DDP) $(ROOT) $(ARGS)

train-imagenet32:  ## train the auto-encoder on ImageNet-32 (image-net.org npz files under DATA_ROOT)
	$(CLI) fit $(BASE) --config configs/imagenet32.yaml $(DDP) $(ROOT) $(ARGS)

train-imagenet64:  ## train one auto-encoder progressively at 32 then 64 on ImageNet-64
	$(CLI) fit $(BASE) --config configs/imagenet64.yaml $(DDP) $(ROOT) $(ARGS)

train-prior-cifar10:  ## train the code prior of a CIFAR-10 auto-encoder (AE_CKPT=path)
	$(CLI) fit $(BASE) --config configs/cifar10.yaml --config configs/prior_cifar10.yaml $(DDP) $(ROOT) $(AE) $(ARGS)

train-prior-imagenet32:  ## train the code prior of an ImageNet-32 auto-encoder (AE_CKPT=path)
	$(CLI) fit $(BASE) --config configs/imagenet32.yaml --config configs/prior_imagenet32.yaml $(DDP) $(ROOT) $(AE) $(ARGS)

train-prior-imagenet64:  ## train the code prior of an ImageNet-64 auto-encoder at 64x64 (AE_CKPT=path)
	$(CLI) fit $(BASE) --config configs/imagenet64.yaml --config configs/prior_imagenet64.yaml $(DDP) $(ROOT) $(AE) $(ARGS)

evaluate:  ## figures A, B, C on the whole test split (CONFIG=prior_cifar10 PRIOR_CKPT=...; the prior holds its auto-encoder)
	$(CLI) test $(BASE) --config configs/$(subst prior_,,$(CONFIG)).yaml --config configs/$(CONFIG).yaml $(ROOT) --ckpt_path=$(PRIOR_CKPT) $(ARGS)

sample:  ## sample images from a trained prior (PRIOR_CKPT=path) into a PNG grid
	$(PY) experiments/sample.py --checkpoint $(PRIOR_CKPT) $(ARGS)

encode:  ## every split's codes once, for a prior's --data.init_args.codes (AE_CKPT=path CONFIG=demo OUT=runs/demo/codes)
	$(CLI) encode --ckpt $(AE_CKPT) $(BASE) --config configs/$(CONFIG).yaml $(ROOT) --out $(OUT) $(ARGS)

compress:  ## images -> one lossless file of figure C's size (PRIOR_CKPT=path IMAGES="a.png b.png" OUT=images.ldq)
	$(CLI) compress --ckpt $(PRIOR_CKPT) $(IMAGES) --out $(OUT) $(ARGS)

decompress:  ## a compressed file -> its images as PNG, bit for bit (FILE=images.ldq OUT=decoded/)
	$(CLI) decompress $(FILE) --out $(OUT) $(ARGS)

bench:  ## run the CPU benchmarks (ratios of interleaved runs) and rewrite their tables in docs/benchmarks.md
	$(PY) benchmarks/train_step.py --parity-steps 10 --docs docs/benchmarks.md && \
	$(PY) benchmarks/evaluation.py --docs docs/benchmarks.md && \
	$(PY) benchmarks/profile_step.py --docs docs/benchmarks.md && \
	$(PY) benchmarks/codec.py && $(PY) benchmarks/quantizer.py && $(PY) benchmarks/prior_sampling.py && \
	$(PY) benchmarks/data_loading.py --root $(or $(DATA_ROOT),data/)

tables:  ## build docs/likelihood_table.md from evaluation.json files (RUNS="runs/a runs/b")
	$(PY) experiments/likelihood_table.py $(RUNS)

clean:  ## remove caches (keeps .venv, data/ and runs/)
	rm -rf .pytest_cache .ruff_cache build *.egg-info && find . -name __pycache__ -prune -exec rm -rf {} +

# `make experiments`: the paper's claims on real images (docs/results.md); EXP_OUT holds the runs and tables
EXP_OUT ?= runs/exp
EXP_ROOT := $(if $(DATA_ROOT),--data-root $(DATA_ROOT),)
.PHONY: experiments
experiments:  ## DQ vs VQ, M sweep, init, split axis, correlation, per-level decodes (DATA_ROOT=CIFAR-10 root; budget: docs/results.md)
	$(PY) experiments/dq_vs_vq.py --out $(EXP_OUT)/dq_vs_vq $(EXP_ROOT) $(ARGS) && \
	$(PY) experiments/split_axis.py --runs $(EXP_OUT)/dq_vs_vq/runs --out $(EXP_OUT)/split_axis $(EXP_ROOT) && \
	$(PY) experiments/correlation.py --runs $(EXP_OUT)/dq_vs_vq/runs --out $(EXP_OUT)/correlation $(EXP_ROOT) && \
	$(PY) experiments/level_decoding.py --runs $(EXP_OUT)/dq_vs_vq/runs --out $(EXP_OUT)/level_decoding $(EXP_ROOT)
