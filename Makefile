# `make demo` and `make test` install whatever is missing into .venv, then run.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch; set TORCH_SPEC=torch (or a CUDA wheel) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.pds-installed

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pds sample --num-samples 16 --out demo-out --force
	@echo "demo: images in demo-out/ (grid: demo-out/grid.png)"

# Everything, the slow tests included: what CI runs.
test: $(STAMP)
	$(BIN)/ruff check pdscli tests scripts
	$(BIN)/python -m pytest -q

# A developer's quick run: the tests marked slow (over ~5 s each on a 2-core CPU) left out.
test-fast: $(STAMP)
	$(BIN)/ruff check pdscli tests scripts
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf demo-out .pytest_cache build *.egg-info
