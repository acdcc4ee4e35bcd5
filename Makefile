# Developer entry points (diffusers style). Each target does its own set-up.
#   make demo   - run the main job end to end (batch flow on the bundled sample manifest)
#   make test   - lint + the full test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WEIGHTS ?= auto
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint format quality bench clean

$(VENV)/.installed: pyproject.toml constraints.txt package.json
	$(PYTHON) -m venv $(VENV)
	# torch first: on CPU machines pip takes the local CPU wheel; the constraint keeps it.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q "uv>=0.4"
	$(VENV)/bin/uv pip install -q --python $(PY) -c constraints.txt -e ".[dev,batch,eval]"
	# glTF validator (Khronos, npm) for the export tests; project-local node_modules.
	npm install --silent --no-audit --no-fund
	touch $@

install: $(VENV)/.installed

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

lint: quality

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: quality
	$(PY) -m pytest -q

demo: install
	$(PY) -m flows.demo --weights $(WEIGHTS)

bench: install
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) node_modules .pytest_cache out .prefect-home
