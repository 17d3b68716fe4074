# Two commands do all set-up on a fresh machine (Debian/Ubuntu, Python >= 3.10):
#   make demo   train the default recipe on the embedded MNIST digits
#   make test   run the test suite
# Both create (or reuse) the virtual environment .venv/ and install what they need,
# including the apt packages ffcv's build needs (as root, or through sudo). docs/install.md says the same
# step by step, for installing cycdata into an environment of your own.
#
# A machine without a GPU can take the CPU-only torch wheels (much smaller than the CUDA ones):
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (after `make clean` if .venv already holds the CUDA build).

VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.cycdata-installed
# python3-venv: Debian's python3 creates no venv without it; g++ and python3-dev: ffcv builds from source.
APT_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config g++ python3-dev python3-venv
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Empty: PyPI's default wheels (CUDA on Linux x86-64). Any pip index that serves torch, e.g. the CPU-only one.
TORCH_INDEX ?=
PYTEST_ARGS ?= -m "not slow"
# What `make dist-check` runs of the sdist's tests (against the built wheel).
DIST_PYTEST_ARGS ?= -m "not slow"

.PHONY: setup demo test test-all lint bench dist-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	    echo "installing apt packages: $(APT_PACKAGES)"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PINS)
	$(PYTHON) -m pip install -q -e '.[dev,ffcv]'
	# ffcv's metadata asks for opencv-python, which collides with albumentations' headless build.
	$(PYTHON) -m pip install -q --no-deps ffcv==1.0.2
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/cycdata train

test: $(STAMP)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PYTHON) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The package as a user gets it: `python -m build` (sdist + wheel, no warnings allowed) into a temporary
# folder; a fresh venv that sees .venv's packages through a .pth line (torch is not installed twice, and
# .venv's editable cycdata stays inactive: a .pth line adds a folder, not the .pth files inside it) gets the
# wheel alone, and copies of .venv's console scripts (torchrun, ...) that run its own python; from outside
# the repository it runs `cycdata plan` and the shortest `cycdata train` (2 epochs, the least a cycle has);
# then the sdist's own tests run from its root against that wheel (docs/install.md says why each setting):
# PYTHONSAFEPATH=1 (Python >= 3.11) keeps the root, whose cycdata/ folder lacks the subpackages the wheel
# maps from loaders/, train/, ..., off sys.path; PYTHONPATH=benchmarks gives back the one benchmark script
# that imports a sibling module; --import-mode=prepend makes the test modules importable by the processes
# they spawn (DDP tests); --pyargs cycdata runs the doctests of the installed modules.
# The build is isolated (setuptools from PyPI); BUILD_ARGS=--no-isolation builds offline with .venv's.
BUILD_ARGS ?=
dist-check: $(STAMP)
	@set -eu; python=$(abspath $(PYTHON)); tmp=$$(mktemp -d -t cycdata-dist-check.XXXXXX); \
	trap 'rm -rf "$$tmp"' EXIT; \
	echo "dist-check: python -m build into $$tmp/dist"; \
	env -u PYTHONDONTWRITEBYTECODE "$$python" -m build $(BUILD_ARGS) --outdir "$$tmp/dist" . >"$$tmp/build.log" 2>&1 \
	    || { cat "$$tmp/build.log"; echo "dist-check: python -m build failed"; exit 1; }; \
	if grep -i "warning" "$$tmp/build.log"; then echo "dist-check: python -m build warned (lines above)"; exit 1; fi; \
	"$$python" -m venv --without-pip "$$tmp/venv"; \
	"$$python" -c "import sysconfig; print(sysconfig.get_path('purelib'))" \
	    >"$$("$$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")/dependencies.pth"; \
	"$$tmp/venv/bin/python" -m pip install -q --no-deps "$$tmp"/dist/*.whl; \
	for script in $(abspath $(VENV))/bin/*; do \
	    target="$$tmp/venv/bin/$${script##*/}"; \
	    if [ ! -e "$$target" ] && head -n 1 "$$script" | grep -qx "#!$$python"; then \
	        sed "1s|.*|#!$$tmp/venv/bin/python|" "$$script" >"$$target"; chmod +x "$$target"; \
	    fi; \
	done; \
	mkdir "$$tmp/run"; cd "$$tmp/run"; \
	"$$tmp/venv/bin/python" -c "import sys, cycdata.train; where = cycdata.train.__file__; \
	    assert where.startswith(sys.prefix), f'cycdata comes from {where}, not the wheel'; print('cycdata from', where)"; \
	"$$tmp/venv/bin/cycdata" --version; \
	"$$tmp/venv/bin/cycdata" plan epochs=2 data.train_limit=500 >plan.log 2>&1 || { cat plan.log; exit 1; }; \
	"$$tmp/venv/bin/cycdata" train epochs=2 data.train_limit=500 --out "$$tmp/run/out" >train.log 2>&1 \
	    || { cat train.log; exit 1; }; \
	tail -n 3 train.log; test -f "$$tmp/run/out/metrics.csv"; test -f "$$tmp/run/out/last.pt"; \
	tar -xzf "$$tmp"/dist/*.tar.gz -C "$$tmp"; cd "$$tmp"/cycdata-*/; \
	echo "dist-check: the sdist's tests from $$PWD"; \
	PYTHONSAFEPATH=1 PYTHONPATH="$$PWD/benchmarks" "$$tmp/venv/bin/python" -m pytest --import-mode=prepend \
	    $(DIST_PYTEST_ARGS) tests --pyargs cycdata

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
