# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := runs/demo

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/mmvssl data synth --out $(DEMO)/data --seed 0
	$(BIN)/mmvssl shards build $(DEMO)/data/train --captions $(DEMO)/data/train/captions.jsonl --out $(DEMO)/shards/train --samples-per-shard 64
	$(BIN)/mmvssl shards build $(DEMO)/data/val --captions $(DEMO)/data/val/captions.jsonl --out $(DEMO)/shards/val --samples-per-shard 64
	$(BIN)/mmvssl pretrain configs/demo/tiny.yaml data.shards=$(DEMO)/shards/train train.output_dir=$(DEMO)/train
	$(BIN)/python eval/compare_random_init.py $(DEMO)/train/model --train $(DEMO)/shards/train --test $(DEMO)/shards/val --out $(DEMO)/eval-random-init
	$(BIN)/mmvssl eval retrieval $(DEMO)/train/model --data $(DEMO)/shards/val --out $(DEMO)/eval

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest ran no test"; exit 1; fi; exit $$rc

clean:
	rm -rf $(DEMO) .pytest_cache
