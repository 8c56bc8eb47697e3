# The two set-up commands of the README. Each creates or updates .venv itself.
#   make run    the main job on the default offline model
#   make test   the test suite (what CI runs)
# And, run on purpose only:
#   make over-refusal  the over-refusal study against the main job's direction (after make run)
#   make frontier the refusal/KL frontier of the main job's run, 200 trials, seed 0 (after make run)
#   make lab      JupyterLab on the notebooks, in the same .venv
#   make report   execute every notebook at full size on the main job's run into docs/notebooks/NN_*.ipynb
#                 (static PNG figures; commit them: tests/test_notebooks.py checks they match the notebooks' code)
#                 and refresh figures/ from the main job's run and notebooks 04-07
#   make figures  only refresh figures/: the main job's, and notebooks 04-07 run at full size
#   make docs     the documentation site, offline, into site/ (checks README's results against the run first)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run over-refusal frontier test lab report figures docs clean-venv

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: on a CPU-only machine this pin takes the local CPU build, not GBs of CUDA wheels
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	# Static PNG figures need a Chromium for kaleido: Debian's package where we may install it, else HTML only.
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: chromium not installed; figures will be written as HTML only (apt-get install chromium)"
	touch $(STAMP)

# On the organism no candidate passes the paper's KL filter; the main job's rule for it, fixed before any
# candidate is scored, is the named fallback (the lowest-KL candidate that bypasses and induces refusal).
run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/refusal-lens run --fallback lowest-kl $(ARGS)

RUN_DIR := runs/smollm2-135m-refusal
over-refusal: $(STAMP)
	test -f $(RUN_DIR)/direction.safetensors || { echo "run 'make run' first: the study reads $(RUN_DIR)/direction.safetensors"; exit 1; }
	HF_HUB_OFFLINE=1 $(BIN)/refusal-lens over-refusal $(ARGS)

frontier: $(STAMP)
	test -f $(RUN_DIR)/report.json || { echo "run 'make run' first: the frontier reads $(RUN_DIR)"; exit 1; }
	HF_HUB_OFFLINE=1 $(BIN)/refusal-lens frontier --model smollm2-135m-refusal --trials 200 --seed 0 $(ARGS)

# The main job's figures, and the frontier's where `make frontier` has run.
COPY_FIGURES = cp $(RUN_DIR)/figures/*.html $(RUN_DIR)/figures/*.png $(RUN_DIR)/figures/plotly.min.js figures/ && \
  { test ! -d $(RUN_DIR)/frontier/figures || cp $(RUN_DIR)/frontier/figures/*.html $(RUN_DIR)/frontier/figures/*.png figures/; }

figures: $(STAMP)
	test -f $(RUN_DIR)/report.json || { echo "run 'make run' first: figures come from $(RUN_DIR)"; exit 1; }
	$(COPY_FIGURES)
	HF_HUB_OFFLINE=1 $(BIN)/python notebooks/execute.py --runs runs --figures figures --out runs/report/figures \
	  --only 04_heads 05_base_vs_chat 06_subspace 07_over_refusal

test: $(STAMP)
	$(BIN)/ruff check refusal_lens tests benchmarks notebooks/*.py docs/*.py
	$(BIN)/python -m pytest $(ARGS)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

report: $(STAMP)
	test -f $(RUN_DIR)/report.json || { echo "run 'make run' first: the pages read $(RUN_DIR)"; exit 1; }
	$(COPY_FIGURES)
	HF_HUB_OFFLINE=1 $(BIN)/python notebooks/execute.py --runs runs --out docs/notebooks --figures figures

# README.md's and the docs pages' result blocks must equal the main job's report.json where a run exists
# (`python docs/gen_results.py` rewrites them); the site builds offline, strict: a broken link fails it.
docs: $(STAMP)
	test ! -f $(RUN_DIR)/report.json || $(BIN)/python docs/gen_results.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean-venv:
	rm -rf $(VENV)
