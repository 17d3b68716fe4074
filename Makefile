# Two commands do all set-up on a fresh machine (Debian/Ubuntu, Python >= 3.10):
#   make demo   train the default recipe on the embedded MNIST digits
#   make test   run the test suite
# Both create (or reuse) the virtual environment .venv/ and install what they need,
# including the apt packages ffcv needs (as root, or through sudo).

VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.cycdata-installed
APT_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup demo test test-all lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	    echo "installing apt packages: $(APT_PACKAGES)"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q $(TORCH_PINS)
	$(PYTHON) -m pip install -q -e '.[dev]' numba
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

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
