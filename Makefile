# One entry point per job. `make install` then `make test`; see README.md.
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
# The CPU-usable torch pair this project is tested with (installed before the package).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
MODEL  ?=
DATA   ?=
OUT    ?=
CALIB  ?= 256
EVAL   ?=
MAX_DROP ?= 0.5
MIN_AGREEMENT ?=
MAX_KL ?=
PLAN_IMAGES ?=
CONFIRM_IMAGES ?=
ARGS    = $(if $(MODEL),--model $(MODEL)) $(if $(DATA),--data $(DATA)) $(if $(OUT),--out $(OUT)) --calib $(CALIB)

.PHONY: install test test-slow eval sites sensitivity errors plan analyze bench clean

install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"

test:
	$(BIN)/python -m pytest -q -m "not slow"

test-slow:
	$(BIN)/python -m pytest -q -m slow

eval:
	$(BIN)/vitq eval $(ARGS)

sensitivity errors plan:
	$(BIN)/vitq $@ $(ARGS)

# Whole pipeline -> out/<model>/report.html. EVAL limits the val images of the final table.
analyze:
	$(BIN)/vitq analyze $(ARGS) $(if $(EVAL),--limit $(EVAL)) --max-drop $(MAX_DROP) \
		$(if $(MIN_AGREEMENT),--min-agreement $(MIN_AGREEMENT)) $(if $(MAX_KL),--max-kl $(MAX_KL)) \
		$(if $(PLAN_IMAGES),--eval-images $(PLAN_IMAGES)) $(if $(CONFIRM_IMAGES),--confirm-images $(CONFIRM_IMAGES))

# Benchmarks are scripts, not timed tests (they need ../shared and minutes of CPU).
bench:
	$(BIN)/python scripts/bench_sensitivity.py
	$(BIN)/python scripts/bench_int8.py

sites:
	$(BIN)/vitq sites $(if $(MODEL),--model $(MODEL))

clean:
	rm -rf out .pytest_cache
