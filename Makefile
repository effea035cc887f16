# The interface: make train | sample | eval | test | sweep | ablation | precision | mask-study | bench | train-ddp |
#   repaint-study | budget-screen | seed-study | gpu-check | clean.
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

.PHONY: train sample eval test sweep ablation precision mask-study repaint-study budget-screen seed-study bench train-ddp gpu-check clean

train: $(ENV)
	$(PYTHON) ddim_inpaint.py train $(ARGS)

sample: $(ENV)
	$(PYTHON) ddim_inpaint.py sample $(ARGS)

eval: $(ENV)
	$(PYTHON) ddim_inpaint.py eval $(ARGS)

test: $(ENV)
	$(PYTHON) -m pytest -q tests $(ARGS)

# Quality against NFE on both axes (hole PSNR and the digit classifier's Frechet distance), uncertainty and
# trajectory pictures from the trained model (about 9 min on the 2-core CPU).
sweep: $(ENV)
	$(PYTHON) ddim_inpaint.py sweep $(ARGS)

# The ablation behind the defaults: 1000-step runs changing one training option at a time
# (about 10 min each on 2 CPU cores), collected into results/ablation.json. Other studies name their
# own runs and folders: the precision study is PRECISION below.
ABLATION_DIR = outputs/ablation
ABLATION_RESULTS = results
ABLATIONS = defaults: \
	no-p2:--p2-gamma=0 \
	no-hole-weight:--hole-weight=1 \
	neither:--hole-weight=1,--p2-gamma=0 \
	eps:--pred=eps \
	self-cond:--self-cond \
	coord-conv:--coord-conv \
	linear-schedule:--schedule=linear \
	no-ema:--ema-decay=0

# Training precision at equal steps over two seeds (make precision): bf16 autocast against fp32.
PRECISION = bf16-seed0: fp32-seed0:--amp=off bf16-seed1:--seed=1 fp32-seed1:--amp=off,--seed=1

precision:
	$(MAKE) ablation ABLATIONS="$(PRECISION)" ABLATION_DIR=outputs/precision ABLATION_RESULTS=results/precision
	for run in $(PRECISION); do \
	  name=$${run%%:*}; mkdir -p results/precision/$$name; \
	  cp outputs/precision/$$name/inpaint_metrics.json results/precision/$$name/; \
	done

ablation: $(ENV)
	for run in $(ABLATIONS); do \
	  name=$${run%%:*}; flags=$$(echo $${run#*:} | tr , ' '); dir=$(ABLATION_DIR)/$$name; \
	  $(PYTHON) ddim_inpaint.py train --steps 1000 --panel-every 0 --out-dir $$dir $$flags $(ARGS) && \
	  $(PYTHON) ddim_inpaint.py eval --num-samples 1 --out-dir $$dir --results-dir $$dir $(ARGS) || exit 1; \
	done
	$(PYTHON) ddim_inpaint.py collect --results-dir $(ABLATION_RESULTS) --out-dir $(ABLATION_DIR)

# Holes beyond the centre box: one model per training-hole recipe at the same wall-clock budget (the default
# run's 12.5 min on the 2-core CPU; keep the machine otherwise idle while they train), each scored on 500
# test digits of every --mask-set and on examples/mask_offcentre.png (results/masks/evals/), collected into
# results/masks/ablation.json, with a samples picture per pair (results/masks/samples/). NAME:FLAGS as in ABLATIONS.
MASK_STUDY_DIR = outputs/masks
MASK_BUDGET = 12.5
MASK_TRAINS = centre:--train-mask=centre box:--train-mask=box free:--train-mask=free \
	box+centre:--train-mask=box,--train-mask-centre=0.5 \
	box12-20+centre:--train-mask=box,--train-box-sides=12-20,--train-mask-centre=0.5
MASK_EVALS = centre box free offcentre

mask-study: $(ENV)
	for run in $(MASK_TRAINS); do \
	  name=$${run%%:*}; flags=$$(echo $${run#*:} | tr , ' '); \
	  $(PYTHON) ddim_inpaint.py train $$flags --time-budget $(MASK_BUDGET) --panel-every 0 \
	    --out-dir $(MASK_STUDY_DIR)/$$name $(ARGS) || exit 1; \
	done
	for run in $(MASK_TRAINS); do name=$${run%%:*}; for set in $(MASK_EVALS); do \
	  holes=$$([ $$set = offcentre ] && echo --mask examples/mask_offcentre.png || echo --mask-set $$set); \
	  dir=results/masks/evals/$$name-on-$$set; \
	  $(PYTHON) ddim_inpaint.py eval --n-eval 500 $$holes --ckpt $(MASK_STUDY_DIR)/$$name/last.pt \
	    --out-dir $$dir --results-dir $$dir $(ARGS) || exit 1; \
	  $(PYTHON) ddim_inpaint.py sample $$holes --ckpt $(MASK_STUDY_DIR)/$$name/last.pt \
	    --out-dir results/masks/samples/$$name-on-$$set $(ARGS) || exit 1; \
	done; done
	$(PYTHON) ddim_inpaint.py collect --out-dir results/masks/evals --results-dir results/masks

# RePaint's recipe at the same wall-clock budget: an unconditional DDPM (--uncond: the network sees x_t only)
# trained for MASK_BUDGET minutes, inpainting by data consistency alone (--dc-repeats 1) and with RePaint's
# resampling (--dc-repeats 5), against the conditional model trained for the same budget (mask-study's centre
# run, trained here if missing), all on the same 500 test digits: results/repaint/.
REPAINT_DIR = outputs/repaint
repaint-study: $(ENV)
	$(PYTHON) ddim_inpaint.py train --uncond --time-budget $(MASK_BUDGET) --panel-every 0 --out-dir $(REPAINT_DIR)/uncond $(ARGS)
	[ -f $(MASK_STUDY_DIR)/centre/last.pt ] || $(PYTHON) ddim_inpaint.py train --time-budget $(MASK_BUDGET) \
	  --panel-every 0 --out-dir $(MASK_STUDY_DIR)/centre $(ARGS)
	for run in uncond-dc1:uncond:1 uncond-dc5:uncond:5 conditional:$(MASK_STUDY_DIR)/centre:1; do \
	  name=$${run%%:*}; rest=$${run#*:}; ckpt=$${rest%%:*}; repeats=$${rest#*:}; \
	  [ $$ckpt = uncond ] && ckpt=$(REPAINT_DIR)/uncond; dir=results/repaint/$$name; \
	  $(PYTHON) ddim_inpaint.py eval --n-eval 500 --dc-repeats $$repeats --ckpt $$ckpt/last.pt --out-dir $$dir \
	    --results-dir $$dir $(ARGS) || exit 1; \
	  $(PYTHON) ddim_inpaint.py sample --dc-repeats $$repeats --ckpt $$ckpt/last.pt --out-dir $$dir $(ARGS) || exit 1; \
	done
	$(PYTHON) ddim_inpaint.py collect --out-dir results/repaint --results-dir results/repaint

# A screen of training options at equal wall-clock: each arm of SCREEN_ARMS (lines NAME<TAB>STEPS<TAB>FLAGS) trains
# for the steps it reaches in the default run's time on the 2-core CPU (timed there side by side, see the file),
# then is scored on the 1,000 test digits with SCREEN_EVAL's sampler; SCREEN_JOBS runs at once (for a GPU: many
# small runs share it well). The recorded screen's arms name the training defaults it started from (batch 128,
# lr 2e-3) and it was scored with the sampler defaults of then (SCREEN_EVAL).
SCREEN_ARMS ?= results/budget/screen/steps.tsv
SCREEN_DIR ?= outputs/screen
SCREEN_RESULTS ?= results/budget/screen
SCREEN_EVAL ?= --ddim-steps 50 --num-samples 4
SCREEN_JOBS ?= 1
budget-screen: $(ENV)
	mkdir -p $(SCREEN_RESULTS)
	tr '\t' '|' < $(SCREEN_ARMS) | xargs -P $(SCREEN_JOBS) -I{} bash -c 'IFS="|" read -r name steps flags <<< "{}"; \
	  dir=$(SCREEN_RESULTS)/$$name; mkdir -p $$dir; \
	  { $(PYTHON) ddim_inpaint.py train --data mnist5k --steps $$steps --panel-every 0 --out-dir $(SCREEN_DIR)/$$name \
	      $$flags $(ARGS) && $(PYTHON) ddim_inpaint.py eval --data mnist5k --out-dir $(SCREEN_DIR)/$$name \
	      --results-dir $$dir $(SCREEN_EVAL) $(ARGS); } > $$dir/log.txt 2>&1; echo "$$name: exit $$? after $$SECONDS s"'
	$(PYTHON) ddim_inpaint.py collect --out-dir $(SCREEN_RESULTS) --results-dir $(SCREEN_RESULTS)

# More training seeds for the bars that sit inside the seed-to-seed noise (issues 13 and 14): per seed of SEEDS,
# today's defaults, the best box recipe and the old defaults train and are scored on all 1,000 test digits
# (results/seeds/run.sh says what each runs), then results/seeds/summary.md tabulates every bar's line per seed.
# SEED_JOBS runs at once: meant for a GPU, where twelve runs share the card (about 6 min for 4 seeds on an H200).
SEEDS ?= 2 3 4 5
SEED_JOBS ?= 1
seed-study: $(ENV)
	PYTHON=$(PYTHON) SEEDS="$(SEEDS)" JOBS=$(SEED_JOBS) bash results/seeds/run.sh
	$(PYTHON) results/seeds/summary.py > results/seeds/summary.md

# Kernel benchmark, then U-Net training/sampling throughput (at batch 128, the batch of the recorded figures in
# results/; ARGS="--batch-size 64" measures the training default).
bench: $(ENV)
	$(PYTHON) kernels.py bench
	$(PYTHON) ddim_inpaint.py bench --batch-size 128 $(ARGS)

# Data-parallel training: NPROC processes on one machine (gloo on CPU, nccl on GPUs).
train-ddp: $(ENV)
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) ddim_inpaint.py train $(ARGS)

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q -r requirements.txt
	touch $@

clean:
	rm -rf outputs .pytest_cache __pycache__ tests/__pycache__

# One check on a machine with a CUDA GPU, with that machine's own python3 (no .venv, no mlxtend):
# the kernel and sampler tests on the device, the kernel benchmark with Triton rows, the sampler's and
# training's images/s (batch 128, 50 DDIM steps, eta 0: the settings of the recorded figures), and the
# goals; everything lands in results/gpu/ (a few minutes on an H100).
GPU_PYTHON ?= python3
GPU_RESULTS ?= results/gpu
gpu-check:
	mkdir -p $(GPU_RESULTS)
	$(GPU_PYTHON) -c "import torch, triton, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, \
	  '| triton', triton.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA GPU')"
	-set -o pipefail; $(GPU_PYTHON) -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_pipeline.py \
	  -k "kernels or keyed or graph or noise_auto" 2>&1 | tee $(GPU_RESULTS)/tests.log
	$(GPU_PYTHON) kernels.py bench --out $(GPU_RESULTS)/kernel_bench.json
	$(GPU_PYTHON) ddim_inpaint.py bench-sampler --batch-size 128 --ddim-steps 50 --eta 0 --results-dir $(GPU_RESULTS) $(ARGS)
	@! grep -E "[0-9]+ (failed|error)" $(GPU_RESULTS)/tests.log  # the benchmarks ran; now fail if a test did
