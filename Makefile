# `make demo` (a short LUT pre-training on the built-in demo data), `make test` (the fast tests), `make test-all`
# (with the slow end-to-end and SLURM tests; what CI runs). Each creates ./.venv on first use. TORCH pins the wheels
# installed first; override it for your CUDA, e.g.
#   make demo TORCH="torch torchvision"
# or use a Python environment you already have (nothing is installed then):
#   make test PY=python
PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
INSTALL := $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.installed)
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= output_dir/demo_lut
GPU_CHECK_DIR ?= output_dir/gpu_check
TEST_WORKERS ?= 2

.PHONY: demo test test-all gpu-check clean-demo

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

demo: $(INSTALL)
	$(PY) tools/make_demo_data.py --out data/demo
	$(PY) main_pretrain.py --model lut_vit_tiny_patch16 --data_path data/demo --input_size 32 --patch_size 4 \
		--batch_size 64 --epochs 3 --warmup_epochs 1 --blr 1.5e-3 --head_mlp_dim 1024 --num_workers 2 \
		--print_freq 10 \
		--output_dir $(DEMO_OUT)
	@echo "Loss per epoch (from $(DEMO_OUT)/log.txt):"
	@$(PY) -c "import json; [print(' epoch', r['epoch'], 'loss %.4f  mim %.4f  bc %.4f' % (r['train_loss'], r['train_mim'], r['train_bc'])) for r in map(json.loads, open('$(DEMO_OUT)/log.txt'))]"

# Two pytest workers (pytest-xdist), one test file each at a time: most tests that take time are single-threaded
# subprocess runs, so two keep a 2-core machine busy. TEST_WORKERS=0 runs them in this process.
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(INSTALL)
	$(PY) -m pytest -q -m "not slow" $(XDIST)

test-all: $(INSTALL)
	$(PY) -m pytest -q $(XDIST) --durations=15

# On a CUDA machine, in at most 5 minutes: the CUDA tests, the ViT-B/16 LUT and MAE steps (bf16, eager and
# compiled), the SDPA kernel, the input pipeline per worker (docs/performance.md). Without CUDA it skips the GPU parts
# and passes; it fails when nvidia-smi lists a GPU that torch cannot use. Results: $(GPU_CHECK_DIR)/gpu_check.json.
gpu-check: $(INSTALL)
	$(PY) tools/gpu_check.py --out $(GPU_CHECK_DIR)

clean-demo:
	rm -rf data/demo $(DEMO_OUT)
