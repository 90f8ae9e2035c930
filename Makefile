# longscribe: every target installs what it needs first (a fresh machine needs only python3).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 50051

.PHONY: demo serve test test-fast proto bench lint deps clean

# ffmpeg comes from the system package manager when it is missing (Debian/Ubuntu, as root).
deps:
	@command -v ffmpeg >/dev/null 2>&1 || { \
	  echo "installing ffmpeg"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq ffmpeg >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq ffmpeg >/dev/null; fi; }

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

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info bench/out
