# The course in two commands (see README):  make lab   |   make test
# Both create .venv and install the pinned packages on first use; later runs skip that step.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
# llama.cpp without the parts the course does not use (multimodal, tools, server): ~25% less to compile
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: setup lab test test-fast budget clean-cache

$(STAMP): requirements.txt requirements-nodeps.txt requirements-llama.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ needed, this is " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# llama.cpp (lesson 11, optional) compiles for minutes: build its wheel in the background while the
	@# rest installs, then install it; a failed build (no C++ compiler) leaves the course working.
	( CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel --quiet \
	    --no-deps -w $(VENV)/wheels -r requirements-llama.txt > $(VENV)/llama-build.log 2>&1 & \
	  $(BIN)/python -m pip install --quiet -r requirements.txt && \
	  $(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt && \
	  $(BIN)/python -m pip install --quiet --no-deps -e . ; status=$$?; wait; \
	  $(BIN)/python -m pip install --quiet --no-deps --no-index --find-links $(VENV)/wheels -r requirements-llama.txt \
	    || echo "llama-cpp-python did not build (see $(VENV)/llama-build.log): lesson 11 runs without it"; \
	  exit $$status )
	touch $(STAMP)

setup: $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/00_welcome_and_setup.ipynb

# One pytest run, two test processes at once (pytest-xdist), whole files per process: the utils tests
# (much of their time is spent waiting on the processes and servers they start) and the notebooks
# (nbval), longest first. Each notebook's kernel gets one PyTorch thread, as on Binder: two 1-thread
# kernels side by side decode about 1.8x as many tokens per second as one 2-thread kernel on 2 cores.
# tests/budget.py prints each notebook's time and peak memory; `make budget` measures them one at a time.
test: export OMP_WAIT_POLICY = PASSIVE
test: export LLM_COURSE_THREADS = 1
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile tests notebooks

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow" tests

budget: $(STAMP)
	$(BIN)/python tests/budget.py

clean-cache:
	rm -rf "$${LLM_COURSE_CACHE:-$$HOME/.cache/llm-course}"
