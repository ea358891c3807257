# One entry point per job. `make install` then `make test`; see README.md.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
# The torch pair this project is tested with (installed before the package).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
# auto: the CUDA build of $(TORCH) where `nvidia-smi -L` lists a GPU, else the CPU build; or cpu, cuda.
TORCH_BUILD ?= auto
# The CPU build comes from PyTorch's CPU index (PyPI's Linux wheels carry ~4 GB of CUDA libraries) ...
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# ... or, where that index cannot be reached, this CPU torch from the configured package registries
# (a local mirror; empty: none), without torchvision: PyPI's torchvision needs PyPI's CUDA torch
# ('operator torchvision::nms does not exist' beside a CPU torch), and vitq runs without it.
# Only for the default TORCH: an overridden TORCH gets no fallback.
TORCH_CPU_FALLBACK ?= $(if $(filter file,$(origin TORCH)),torch==2.13.0+cpu)
MODEL  ?=
DATA   ?=
OUT    ?=
CALIB  ?= 256
EVAL   ?=
MAX_DROP ?=
MIN_AGREEMENT ?=
MAX_KL ?=
PLAN_IMAGES ?=
CONFIRM_IMAGES ?=
# with a budget: further val images the decide stage may measure (empty: every one left; 0: none),
# and what runs it (torch, onnxruntime, torch-int8)
DECIDE_IMAGES ?=
DECIDE_BACKEND ?=
# only-candidates measured in the order of the taylor estimate (empty: the default; 0: all)
MEASURE_TOP ?=
# formats the planner chooses between (e.g. int8,a16w8,w4a8,float; empty: int8 or float) and its cost
FORMATS ?=
COST ?=
# `make sensitivity SHARD=I/N`: this process's share of the candidates (auto: torchrun's RANK/WORLD_SIZE);
# the next `make sensitivity` without SHARD merges the shard logs (README "Scale-out").
SHARD  ?=
# auto (CUDA when available), cpu or cuda; TF32=1 allows TF32 matmuls on CUDA.
DEVICE ?=
TF32   ?=
ARGS    = $(if $(MODEL),--model $(MODEL)) $(if $(DATA),--data $(DATA)) $(if $(OUT),--out $(OUT)) --calib $(CALIB) \
          $(if $(DEVICE),--device $(DEVICE)) $(if $(TF32),--tf32)

.PHONY: install install-peers test test-slow test-transformers4 eval sites sensitivity errors plan analyze bench clean

install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	scripts/install_torch.sh $(BIN)/python "$(TORCH_BUILD)" "$(TORCH)" "$(TORCH_CPU_INDEX)" "$(TORCH_CPU_FALLBACK)"
	$(BIN)/python -m pip install -q -e ".[test]"
	@# timm needs torchvision: installed only beside a torch that has one (never replaces the CPU fallback's torch)
	if $(BIN)/python -c "import torchvision" 2>/dev/null; then $(BIN)/python -m pip install -q "timm>=1.0"; \
	else echo "timm not installed: this torch has no torchvision (timm tests will skip)"; fi
	$(BIN)/python -c "import torch; print('installed torch', torch.__version__, f'(CUDA {torch.version.cuda})' if torch.version.cuda else '(CPU)')"

test:
	$(BIN)/python -m pytest -q -m "not slow"

test-slow:
	$(BIN)/python -m pytest -q -m slow

# transformers 4.x check: $(VENV_TF4) holds transformers $(TF4) and reuses $(VENV)'s torch (and the rest
# of its packages) through a .pth file listed after its own site-packages; `pip install -e .` there must
# keep transformers 4.x. Then the family, site and config tests run on tiny models under 4.x.
TF4      ?= transformers==4.46.3
VENV_TF4 ?= .venv-tf4
TF4_TESTS ?= tests/test_sites.py tests/test_families.py tests/test_more_families.py tests/test_config.py tests/test_model.py
test-transformers4:
	test -x $(VENV_TF4)/bin/python || $(BIN)/python -m venv $(VENV_TF4)
	$(VENV_TF4)/bin/python -c "import sysconfig, pathlib, sys; pathlib.Path(sysconfig.get_paths()['purelib'], 'vitq_base_venv.pth').write_text(sys.argv[1] + '\n')" \
		"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	$(VENV_TF4)/bin/python -m pip install -q "$(TF4)" pytest
	$(VENV_TF4)/bin/python -m pip install -q -e .
	$(VENV_TF4)/bin/python -c "import transformers as t; assert t.__version__.startswith('4.'), t.__version__; print('transformers', t.__version__)"
	$(VENV_TF4)/bin/python -m pytest -q -p no:cacheprovider $(TF4_TESTS)

eval:
	$(BIN)/vitq eval $(ARGS)

sensitivity:
	$(BIN)/vitq $@ $(ARGS) $(if $(SHARD),--shard $(SHARD))

errors plan:
	$(BIN)/vitq $@ $(ARGS)

# Whole pipeline -> out/<model>/report.html. EVAL limits the val images of the final table.
analyze:
	$(BIN)/vitq analyze $(ARGS) $(if $(EVAL),--limit $(EVAL)) $(if $(MAX_DROP),--max-drop $(MAX_DROP)) \
		$(if $(MIN_AGREEMENT),--min-agreement $(MIN_AGREEMENT)) $(if $(MAX_KL),--max-kl $(MAX_KL)) \
		$(if $(PLAN_IMAGES),--eval-images $(PLAN_IMAGES)) $(if $(CONFIRM_IMAGES),--confirm-images $(CONFIRM_IMAGES)) \
		$(if $(MEASURE_TOP),--measure-top $(MEASURE_TOP)) $(if $(DECIDE_IMAGES),--decide-images $(DECIDE_IMAGES)) \
		$(if $(DECIDE_BACKEND),--decide-backend $(DECIDE_BACKEND)) $(if $(FORMATS),--formats $(FORMATS)) \
		$(if $(COST),--cost $(COST))

# Benchmarks are scripts, not timed tests (they need ../shared and minutes of CPU).
# Each figure in one run: --help time, fake-quant vs FP32 forward, taylor vs measured `only`
# ranking on both shared probes (measured here on the same 64 images), prefix-cache speed-up,
# NNCF's PTQ (OpenVINO) against vitq's presets and plan (ONNX Runtime) on both probes (docs/results.md, "vitq beside NNCF").
bench:
	$(BIN)/python scripts/bench_help.py
	$(BIN)/python scripts/bench_fakequant.py $(if $(DEVICE),--device $(DEVICE))
	$(BIN)/python scripts/bench_taylor.py --probe fmnist --images 64 --probes 4 $(if $(DEVICE),--device $(DEVICE))
	$(BIN)/python scripts/bench_taylor.py --probe in1k --images 64 --probes 4 $(if $(DEVICE),--device $(DEVICE))
	$(BIN)/python scripts/bench_sensitivity.py
	$(BIN)/python scripts/bench_batched.py
	$(BIN)/python scripts/bench_int8.py
	$(BIN)/python scripts/bench_families.py
	$(BIN)/python scripts/bench_analyze.py
	OMP_NUM_THREADS=1 $(BIN)/python scripts/bench_peers.py --probe fmnist --threads 1
	OMP_NUM_THREADS=1 $(BIN)/python scripts/bench_peers.py --probe in1k --threads 1

# the `peers` extra (nncf, openvino) that scripts/bench_peers.py needs; without it the benchmark skips
install-peers:
	$(BIN)/python -m pip install -q -e ".[peers]"

sites:
	$(BIN)/vitq sites $(if $(MODEL),--model $(MODEL)) $(if $(DEVICE),--device $(DEVICE))

clean:
	rm -rf out .pytest_cache
