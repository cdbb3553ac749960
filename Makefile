# The two commands of the README. Both install what they need first (idempotent).
PYTHON ?= python3

.PHONY: install demo test test-all

# The stamp's name is a hash of the interpreter's prefix and of where that interpreter imports
# wsitools from (in isolated mode, so this folder itself does not count): installed again for
# another interpreter, for a venv made anew at the same path or one whose wsitools is not this
# checkout's, and when pyproject.toml changes. The recipe names the stamp after installing.
STAMP_NAME := $(PYTHON) -I -c 'import hashlib, importlib.util, sys; spec = importlib.util.find_spec("wsitools"); key = sys.prefix + "|" + (spec.origin if spec else ""); print(".installed-" + hashlib.sha1(key.encode()).hexdigest()[:10])'
STAMP := $(shell $(STAMP_NAME))

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q -e ".[test]"
	touch "$$($(STAMP_NAME))"

demo: install
	$(PYTHON) -m wsitools demo --out demo_run

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

# The fast tier above plus the slow tier (marked `slow`); CI runs both.
test-all: test
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m slow
