# forkd: `make demo` on a fresh Debian 12 machine installs what it needs, builds the guest image,
# creates the snapshot `pyagent` and forks children from it; `make test` runs the test suite.
#
# forkd and its dev tools are installed (editable) into the virtual environment $(VENV), made with
# `$(PYTHON) -m venv`: Debian 12's python3 has no pip and refuses `pip install` outside a venv (PEP 668).
# Every target below runs the venv's tools ($(VENV)/bin first on PATH), so nothing needs activating;
# afterwards `. .venv/bin/activate` (or .venv/bin/forkd ...) gives you the commands.
#   PYTHON  the interpreter the venvs are made with (default: the system's python3)
#   VENV    forkd's venv (default .venv, in this directory)
PYTHON ?= python3
VENV ?= .venv
VENV_BIN := $(abspath $(VENV))/bin
VENV_PYTHON := $(VENV_BIN)/python
# The recipes of demo/test/lint/...: the venv's forkd, forkd-controller, pytest, ruff, mypy come first
# (tests start `forkd` by name), without activating it.
WITH_VENV := PATH="$(VENV_BIN):$$PATH"
APT_PACKAGES = qemu-system-x86 qemu-utils e2fsprogs cpio python3 python3-venv zstd iproute2 nftables procps
N ?= 10
# QEMU=backports installs QEMU 10 from bookworm-backports (children then open memory.bin read-only).
QEMU ?= bookworm
BACKPORTS_LIST = /etc/apt/sources.list.d/forkd-bookworm-backports.list

.PHONY: demo deps install apt venv pip compat-venv openapi image snapshot test test-unit lint bench clean
.PHONY: clean-debian-check systemd-check

demo: deps image snapshot
	$(VENV_BIN)/forkd fork --tag pyagent -n $(N) --eval 'numpy.zeros(5).tolist()'

# `make deps` installs the apt packages (as root, like `make demo`) and then the venvs.
deps: apt pip compat-venv e2b-venv ts

# A host that only runs the daemon (docs/deployment.md: /opt/forkd, packaging/systemd): the apt packages and
# $(VENV) with forkd; not the test SDKs' venvs or Node.js.
install: apt pip

# The guest image builder downloads the guest kernel package with apt, so the lists must be present too.
apt:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	fi
ifeq ($(QEMU),backports)
	@if ! apt-cache policy | grep -q bookworm-backports; then \
		echo 'deb http://deb.debian.org/debian bookworm-backports main' > $(BACKPORTS_LIST) && apt-get update -q; \
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86
endif

# forkd's venv: made once with $(PYTHON) (Debian: needs python3-venv, which `make apt` installs).
$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

venv: $(VENV_PYTHON)

pip: $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -q -e '.[dev]'

# The original forkd's Python SDK (PyPI forkd 0.5.3: our import name, so a venv of its own), which
# tests/integration/test_original_sdk.py drives against our daemon.
compat-venv:
	@test -x .venv-compat/bin/python || $(PYTHON) -m venv .venv-compat
	.venv-compat/bin/python -m pip install -q 'forkd==0.5.3'

# The official E2B SDKs (e2b, e2b-code-interpreter from PyPI: the newest tested and an older 2.x, each in a
# venv of its own), which tests/integration/test_e2b.py drives against `forkd-controller serve --e2b-bind` (docs/e2b.md).
.PHONY: e2b-venv
e2b-venv:
	@test -x .venv-e2b/bin/python || $(PYTHON) -m venv .venv-e2b
	.venv-e2b/bin/python -m pip install -q 'e2b==2.63.0' 'e2b-code-interpreter==2.11.5'
	@test -x .venv-e2b-old/bin/python || $(PYTHON) -m venv .venv-e2b-old
	.venv-e2b-old/bin/python -m pip install -q 'e2b==2.50.0' 'e2b-code-interpreter==2.10.0'

# The TypeScript SDK (typescript/, docs/typescript.md): Node.js 18+ and npm (Debian's when missing), its pinned
# dev dependencies from package-lock.json, compiled to typescript/dist. tests/integration/test_typescript_sdk.py runs it.
.PHONY: ts lint-ts
ts:
	@command -v npm >/dev/null 2>&1 || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm; }
	cd typescript && npm ci --no-audit --no-fund && npm run build

# tsc --noEmit (the SDK against the types generated from docs/openapi.json), and those types up to date
lint-ts:
	cd typescript && npx tsc --noEmit && npm run check:schema

# docs/openapi.json, the contract the daemon serves and the SDKs are checked against
openapi:
	$(VENV_BIN)/forkd-controller openapi --out docs/openapi.json

image:
	$(VENV_BIN)/forkd image build

snapshot:
	@$(VENV_BIN)/forkd snapshot info pyagent >/dev/null 2>&1 || $(VENV_BIN)/forkd snapshot create --tag pyagent

test:
	$(WITH_VENV) $(VENV_PYTHON) -m pytest -ra

test-unit:
	$(WITH_VENV) $(VENV_PYTHON) -m pytest -ra tests/unit

lint:
	$(VENV_BIN)/ruff check src tests bench
	$(WITH_VENV) $(VENV_BIN)/mypy
	$(MAKE) lint-ts

bench:
	$(WITH_VENV) $(VENV_PYTHON) bench/fanout.py

clean:
	$(VENV_BIN)/forkd cleanup

# Proofs in a clean Debian 12 root made with debootstrap, run with podman (as root; docs/deployment.md):
# the README's `make demo` and `make test` (long: the whole suite), and the systemd unit under a real systemd.
# CLEAN_BASE=DIR copies a pristine `debootstrap --variant=minbase bookworm` tree instead of debootstrapping.
CLEAN_BASE ?=
clean-debian-check:
	scripts/clean-debian-check.sh $(if $(CLEAN_BASE),--base $(CLEAN_BASE))

systemd-check:
	scripts/systemd-check.sh $(if $(CLEAN_BASE),--base $(CLEAN_BASE))
