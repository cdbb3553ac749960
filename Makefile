# The two commands of the README. Both install what they need first (idempotent).
PYTHON ?= python3

.PHONY: install demo test test-all

install:
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) -m wsitools demo --out demo_run

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

# The fast tier above plus the slow tier (marked `slow`); CI runs both.
test-all: test
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m slow
