# Two entry points: `make demo` (the whole pipeline on the embedded demo data) and `make test`.
# Both create .venv/ from requirements.txt and requirements-nodeps.txt on first use and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean search

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) -m crossmodal.pipeline --demo $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed lint
	$(PY) -m pytest -q $(ARGS)

bench: $(VENV)/.installed
	$(PY) -m bench.run_all

# After `make demo`: the demo's best model (highest validation rsum in runs/demo/summary.json) in the
# browser at http://127.0.0.1:8000/ (ARGS="--port 8080" to change; Ctrl-C stops).
search: $(VENV)/.installed
	$(PY) -m crossmodal.serve --run runs/demo --split val --coco-root data/demo $(ARGS)

clean:
	rm -rf data/demo features runs
