# The interface: make train | sample | eval | test | bench | clean.
#   ARGS="--steps 500 --hole 12"   passes flags to ddim_inpaint.py
#   PYTHON=python3                 uses an existing environment instead of creating .venv
PYTHON ?= .venv/bin/python
ARGS ?=

# Only the default PYTHON needs the virtual environment, made once from requirements.txt.
ifeq ($(PYTHON),.venv/bin/python)
ENV := .venv/.installed
endif

.PHONY: train sample eval test bench clean

train: $(ENV)
	$(PYTHON) ddim_inpaint.py train $(ARGS)

sample: $(ENV)
	$(PYTHON) ddim_inpaint.py sample $(ARGS)

eval: $(ENV)
	$(PYTHON) ddim_inpaint.py eval $(ARGS)

test: $(ENV)
	$(PYTHON) -m pytest -q tests $(ARGS)

bench: $(ENV)
	$(PYTHON) kernels.py bench $(ARGS)

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q -r requirements.txt
	touch $@

clean:
	rm -rf outputs .pytest_cache __pycache__ tests/__pycache__
