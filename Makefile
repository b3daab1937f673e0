# Two entry points from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sequencer demo

# pytest exits with 5 when it collects no test: that is a broken suite, not a pass.
test: $(STAMP)
	@$(VENV)/bin/pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

# Benchmarks against bare Temporal; writes docs/benchmarks.md (takes a long time).
bench: $(STAMP)
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV)
