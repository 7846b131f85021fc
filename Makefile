# Two entry points: `make demo` and `make test`. Everything installs into .venv
# from constraints.txt, so every machine gets the same versions.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= default
RUN ?= runs/$(RECIPE)
PORT ?= 8000

.PHONY: install demo build serve test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

build: install
	$(BIN)/glassforge build --recipe $(RECIPE) --out $(RUN)

demo: build
	$(BIN)/glassforge serve $(RUN) --port $(PORT) --banner

serve: install
	$(BIN)/glassforge serve $(RUN) --port $(PORT) --banner

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
