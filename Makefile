# longscribe: every target installs what it needs first (a fresh machine needs only python3).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 50051

.PHONY: demo serve test test-fast proto bench bench-live lint deps clean

# ffmpeg and jemalloc (the server's allocator, see service/memory.py) come from the system
# package manager when they are missing (Debian/Ubuntu, as root or through sudo).
APT_GET = $(if $(filter 0,$(shell id -u)),,sudo) apt-get
deps:
	@missing=""; \
	command -v ffmpeg >/dev/null 2>&1 || missing="$$missing ffmpeg"; \
	ldconfig -p 2>/dev/null | grep -q libjemalloc || missing="$$missing libjemalloc2"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(APT_GET) update -qq && $(APT_GET) install -y -qq $$missing >/dev/null; \
	fi

# torch is pinned to the CPU build that pip finds locally; an unpinned torch pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$${TORCH_VERSION:-2.13.0}"
	$(PY) -m pip install -q -e '.[server,dev]'
	touch $(STAMP)

install: deps $(STAMP)

demo: install
	$(PY) -m longscribe.service.demo $(DEMO_SOURCE)

serve: install
	$(VENV)/bin/longscribe serve --host $(HOST) --port $(PORT)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

proto: install
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --grpc_python_out=protos \
	  --pyi_out=protos protos/longscribe/v1/transcription.proto

bench: install
	$(PY) -m bench.run $(BENCH_ARGS)

# live audio: the LJSpeech reading at 1x real time (final latency, WER vs batch, drops), then
# several streams at 4x (backpressure, drops, RSS, health); JSON to $(BENCH_OUT)
bench-live: install
	BENCH_OUT=$${BENCH_OUT:-bench/out/live.json} $(PY) -m bench.live $(BENCH_LIVE_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info bench/out
