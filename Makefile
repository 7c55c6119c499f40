# The two commands of the README: `make demo` and `make test`. Both create .venv when missing and
# bring it to exactly requirements.lock first (packages added, changed or removed), so a stale .venv
# from an older checkout is refreshed, never silently reused. `make lock` refreshes the lock.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LOCK   := requirements.lock
DEMO   := runs/demo
# uv installs and writes the lock; its own version is the one the lock names.
UV_VERSION := $(shell sed -n 's/^uv==\([^ ;]*\).*/\1/p' $(LOCK))
UV     := $(BIN)/uv
# One resolution for every supported Python (3.10 to 3.12) and platform, with hashes.
LOCK_FLAGS := --extra dev --universal --python-version 3.10 --generate-hashes

.PHONY: install lock demo test clean browser

# uv pip sync: the venv becomes the lock, verifying every hash (a no-op when it already is);
# sync removes what the lock does not list, mmvssl itself included, so it is installed again
# after (editable, no dependencies, built by the locked hatchling).
install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(UV) && $(UV) --version | grep -q " $(UV_VERSION)" || \
	  $(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(UV) pip sync --quiet --python $(BIN)/python $(LOCK)
	$(UV) pip install --quiet --python $(BIN)/python --no-deps --no-build-isolation -e .

# Re-resolve pyproject.toml's ranges to the newest versions they admit; then run `make test`
# and commit requirements.lock with the code it passed with.
lock:
	test -x $(UV) || $(MAKE) install
	$(UV) pip compile --quiet pyproject.toml $(LOCK_FLAGS) --upgrade -o $(LOCK)

demo: install
	rm -rf $(DEMO)
	$(BIN)/mmvssl data synth --out $(DEMO)/data --seed 0
	$(BIN)/mmvssl shards build $(DEMO)/data/train --captions $(DEMO)/data/train/captions.jsonl --out $(DEMO)/shards/train --samples-per-shard 64
	$(BIN)/mmvssl shards build $(DEMO)/data/val --captions $(DEMO)/data/val/captions.jsonl --out $(DEMO)/shards/val --samples-per-shard 64
	$(BIN)/mmvssl pretrain configs/demo/tiny.yaml data.shards=$(DEMO)/shards/train train.output_dir=$(DEMO)/train
	$(BIN)/python eval/compare_random_init.py $(DEMO)/train/model --train $(DEMO)/shards/train --test $(DEMO)/shards/val --out $(DEMO)/eval-random-init
	$(BIN)/mmvssl eval retrieval $(DEMO)/train/model --data $(DEMO)/shards/val --out $(DEMO)/eval

# The browser test of `mmvssl serve` drives Debian's chromium (tests/test_search_browser.py): install it
# when missing (CI runs as root); if that is impossible the test fails with a one-line message.
CHROMIUM := /usr/bin/chromium
browser:
	test -x $(CHROMIUM) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || \
	  echo "warning: could not install chromium; the browser test will fail"

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: install browser
	$(BIN)/python -m pytest tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest ran no test"; exit 1; fi; exit $$rc

clean:
	rm -rf $(DEMO) .pytest_cache
