PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint fuzz mutate clean

# setup also byte-compiles the tree (what changed since the last time), as pip install
# does for an installed package: each daemon a test, the demo or the bench spawns then
# imports bytecode instead of compiling every module again (0.15-0.2 s of CPU before
# READY where PYTHONDONTWRITEBYTECODE is set: docs/MEASUREMENTS.md, "READY from bytecode")
setup: $(STAMP)
	@$(PY) -m compileall -q loader aio protocol cli bench workloads examples >/dev/null

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# liburing writes a cache of its module names on its first import; write it here once,
	@# not in test processes racing each other (a failed import is the probe's to report)
	-$(PY) -c "import liburing" >/dev/null 2>&1
	touch $(STAMP)

demo: setup
	$(VENV)/bin/pageload demo

# --max-worker-restart=0: a worker that dies fails the run at once, naming its test;
# restarting one under --dist loadfile can leave the run hanging (pytest-xdist #784).
# --timeout: a test that hangs past 10 minutes (the whole suite takes 4-5) has its
# threads' stacks printed and its worker ended, so the run fails naming it, not CI's clock
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile --max-worker-restart=0 --timeout=600 --timeout-method=thread

bench: setup
	$(VENV)/bin/pageload bench

# >= 1M seeded random/mutated frames over many connections to a real daemon, with
# checked waits alongside; fails on a crash, a wrong byte, or RssAnon growth > 10 MiB.
# Then 100k seeded working-set files through every reader (60 through the commands);
# fails on anything but a working set or a one-line refusal, or a decode memory peak
# above what read_working_set's check assumes.
fuzz: setup
	$(PY) -m workloads.fuzz --frames 1000000
	$(PY) -m workloads.fuzz_uffd --handshakes 100000
	$(PY) -m workloads.wsfuzz --files 100000 --commands 60

# mutation testing (cosmic-ray) of the protocol, the loader's waits/checksums/shutdown,
# the uffd answering code and restore's options, each against its own tests; not part
# of `make test`.  Report: .mutate/report.md (docs/TESTING.md).  MUTATE_ARGS: e.g.
# "protocol --sample 100" (targets, a random sample per target, --jobs N)
mutate: setup
	$(PY) -m pip install -q 'cosmic-ray>=8.7,<9'
	$(PY) mutation/run.py $(MUTATE_ARGS)

lint: setup
	$(PY) -m pip install -q ruff mypy
	$(VENV)/bin/ruff check loader aio protocol workloads bench cli tests examples
	$(VENV)/bin/mypy loader aio protocol workloads bench cli

clean:
	rm -rf $(VENV) .demo .bench .mutate
