# The two set-up commands of the README. Each creates or updates .venv itself.
#   make run    the main job on the default offline model
#   make test   the test suite (what CI runs)
# And, run on purpose only:
#   make over-refusal  the over-refusal study against the main job's direction (after make run)
#   make lab      JupyterLab on the notebooks, in the same .venv
#   make report   execute every notebook on the main job's run into docs/notebooks/*.html (about 15 minutes)
#   make figures  refresh the committed figures/ from the main job's run and notebooks 04-06 (about 15 minutes)
#   make docs     the documentation site, offline, into site/ (checks README's results against the run first)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run over-refusal test lab report figures docs clean-venv

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

figures: $(STAMP)
	test -f $(RUN_DIR)/report.json || { echo "run 'make run' first: figures come from $(RUN_DIR)"; exit 1; }
	cp $(RUN_DIR)/figures/*.html $(RUN_DIR)/figures/*.png $(RUN_DIR)/figures/plotly.min.js figures/
	cd notebooks && HF_HUB_OFFLINE=1 ../$(BIN)/papermill 04_heads.ipynb /tmp/04.ipynb -p RUNS ../runs -p FIGURES ../figures \
	  -p N_PROMPTS 96 -p GCG_PROMPTS 4 -p GCG_STEPS 30 -p GCG_WIDTH 32 -p GCG_TOKENS 12 -p N_RANDOM 5 -p MAX_NEW_TOKENS 48
	cd notebooks && HF_HUB_OFFLINE=1 ../$(BIN)/papermill 05_base_vs_chat.ipynb /tmp/05.ipynb -p RUNS ../runs \
	  -p FIGURES ../figures -p N_TRAIN 100 -p N_TEST 48 -p MAX_NEW_TOKENS 48
	cd notebooks && HF_HUB_OFFLINE=1 ../$(BIN)/papermill 06_subspace.ipynb /tmp/06.ipynb -p RUNS ../runs \
	  -p FIGURES ../figures -p K_MAX 8 -p N_TEST 32 -p MAX_NEW_TOKENS 32

test: $(STAMP)
	$(BIN)/ruff check refusal_lens tests benchmarks notebooks/*.py
	$(BIN)/python -m pytest $(ARGS)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

report: $(STAMP)
	test -f $(RUN_DIR)/report.json || { echo "run 'make run' first: the pages read $(RUN_DIR)"; exit 1; }
	HF_HUB_OFFLINE=1 $(BIN)/python notebooks/render_html.py --runs runs --out docs/notebooks

# README.md's and the docs pages' result blocks must equal the main job's report.json where a run exists
# (`python docs/gen_results.py` rewrites them); the site builds offline, strict: a broken link fails it.
docs: $(STAMP)
	test ! -f $(RUN_DIR)/report.json || $(BIN)/python docs/gen_results.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean-venv:
	rm -rf $(VENV)
