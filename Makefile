# Front-door commands (see README.md). Each installs what it needs on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# System packages: Java for the local backend's Deephaven; QEMU and debootstrap for the microVMs;
# nftables for Firecracker guest networking (NAT); chromium for the browser tests (driven by playwright);
# binutils for the Firecracker tests' minimal guest; openssh-server for the cluster tests' hosts.
SYSTEM_PACKAGES := openjdk-17-jre-headless qemu-system-x86 debootstrap mmdebstrap lz4 e2fsprogs nftables chromium \
	binutils openssh-server

$(VENV)/.installed: pyproject.toml
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing:$$missing"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "missing system packages:$$missing (run as root, or: sudo apt-get install$$missing)"; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[local,test]'
	touch $@

# Builds the microVM image (seconds when nothing changed), installs the "Deephaven microVM" kernelspec
# into the venv, then runs notebooks/quickstart.ipynb end to end, headless; the executed copy lands in build/.
demo: setup
	$(VENV)/bin/dhvm prepare || echo "dhvm prepare failed (see above): the demo runs on the local backend"
	$(VENV)/bin/dhvm kernel install --sys-prefix
	@echo "the 'Deephaven microVM' kernel (dhvm) is installed in $(VENV); start it with: $(VENV)/bin/jupyter lab"
	$(VENV)/bin/jupyter nbconvert --to notebook --execute notebooks/quickstart.ipynb \
	  --output-dir build --output quickstart.executed.ipynb
	@echo "executed notebook: build/quickstart.executed.ipynb"

test: setup
	$(PY) -m pytest -ra --durations=25

bench: setup
	$(PY) bench/bench_local.py
	$(PY) bench/bench_fetch.py
	$(PY) bench/bench_live.py
	$(PY) bench/bench_qemu.py
	$(PY) bench/bench_checkpoint.py
	$(PY) bench/bench_rich.py
	$(PY) bench/bench_firecracker.py --vmm --qemu-home $(HOME)/.dhg
	$(PY) bench/bench_cluster.py --home $(HOME)/.dhg

clean:
	rm -rf build .pytest_cache
