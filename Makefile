# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   - the main job end to end on this machine
#   make test   - the test suite (make test-fast: without the tests marked slow)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= build/demo
# the trained demo model (tools/train_filip.py on tools/scenes.py); `make demo-random` serves
# a random-weight preset instead (ViT-B-32: the model of the speed figures)
DEMO_CKPT ?= models/filip-scenes.pt
DEMO_PRESET ?= ViT-B-32
RANDOM_CKPT := $(DEMO_DIR)/filip-$(DEMO_PRESET).pt

.PHONY: venv browser demo demo-random test test-fast clean perf-analyzer

$(STAMP): pyproject.toml client/pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# two distributions: the client + contract + HTTP gateway (client/) and the engine (.), both
	# editable; the engine with its CPU reduced-precision engines (OpenVINO, NNCF)
	$(BIN)/python -m pip install -q -e "./client[gateway]" -e ".[dev,cpu]"
	# open_clip_torch is installed without its dependencies only for the CLIP BPE merges
	# file it ships (bpe_simple_vocab_16e6.txt.gz) and CLIP's reference tokenizer used
	# by the tests; the engine never imports it.
	$(BIN)/python -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $(STAMP)

# The gateway page's browser test drives Debian's chromium (Playwright cannot download
# browsers here): installed where it is missing and apt-get exists; a failure is tolerated
# (the test then skips saying why).
browser:
	-@test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

venv: $(STAMP) browser

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	$(BIN)/python export/to_trt.py $(DEMO_CKPT) --out $(DEMO_DIR)/triton_models
	$(BIN)/python -m tools.demo --repository $(DEMO_DIR)/triton_models --checkpoint $(DEMO_CKPT) \
	  --scenes-eval $(DEMO_DIR)/scenes

demo-random: $(STAMP)
	test -f $(RANDOM_CKPT) || $(BIN)/python -m filip_engine.checkpoint init --preset $(DEMO_PRESET) --out $(RANDOM_CKPT)
	$(BIN)/python export/to_trt.py $(RANDOM_CKPT) --out $(DEMO_DIR)/random/triton_models
	$(BIN)/python -m tools.demo --repository $(DEMO_DIR)/random/triton_models --checkpoint $(RANDOM_CKPT)

# Triton's perf_analyzer (from the tritonclient 2.48.0 wheel) into build/perf_analyzer, for
# python -m tools.bench --perf-analyzer; needs the network once, and nothing else depends on it
perf-analyzer: $(STAMP)
	$(BIN)/python -m tools.perf_analyzer --obtain

clean:
	rm -rf build .pytest_cache
