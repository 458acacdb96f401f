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

.PHONY: install demo test trials repro clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,sentence,stack,browser]'
	touch $@

# The main job on the embedded digits: the committed champion registered through the evaluation and the gate, a
# fine-tuned teacher landing in data/teachers/, the watch's warm re-distillation, and both versions' tables.
demo: install
	$(BIN)/redistill demo

test: install
	$(BIN)/pytest -q

# kill -9 at every stage of a real cycle, then the same command again (tests/test_kill.py); the tracking
# and Prefect servers going away mid-cycle (tests/test_servers.py); 12 processes at once (tests/test_load.py);
# every kind of teacher through a whole cycle from an empty workspace (tests/test_byo.py); a flow-matching
# teacher's bench (tests/test_rectified.py); a text-to-image teacher's whole cycle with an LCM-LoRA student
# (tests/test_text_to_image.py); the embedded text-to-image teacher's CLI (tests/test_t2i_teacher.py); `redistill
# stack` up, at work and down on real PostgreSQL, MLflow and Prefect servers and workers (tests/test_stack.py);
# distillation on two processes (accelerate launch, gloo): equal to one, resumed after kill -9, only the main
# process writing, and a whole cycle (tests/test_multiprocess.py); the champion's lineage on its MLflow UI pages
# in headless Chromium (tests/test_ui_lineage.py); a cycle killed mid-distillation resumes and registers once
# (tests/test_cycle.py) and a killed teacher training resumes to the same weights (tests/test_features_teacher.py);
# `redistill bench --quick` end to end (tests/test_bench.py)
trials: install
	$(BIN)/pytest -q -s -m trials tests/test_kill.py tests/test_servers.py tests/test_load.py tests/test_byo.py tests/test_rectified.py \
		tests/test_text_to_image.py tests/test_t2i_teacher.py tests/test_stack.py tests/test_multiprocess.py \
		tests/test_ui_lineage.py tests/test_cycle.py tests/test_features_teacher.py tests/test_bench.py

# Rebuild every stage whose inputs changed (dvc.yaml); the committed teacher is kept if unchanged.
repro: install
	$(BIN)/dvc repro

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
