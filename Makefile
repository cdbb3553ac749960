# The two commands of the README. Both install what they need first (idempotent).
PYTHON ?= python3

.PHONY: install demo test test-all

# Installed once per interpreter (the stamp names its prefix), again when pyproject.toml changes.
STAMP := .installed-$(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])')

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(PYTHON) -m wsitools demo --out demo_run

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

# The fast tier above plus the slow tier (marked `slow`); CI runs both.
test-all: test
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m slow
