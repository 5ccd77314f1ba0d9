# forkd: `make demo` on a fresh Debian 12 machine installs what it needs, builds the guest image,
# creates the snapshot `pyagent` and forks children from it; `make test` runs the test suite.
PYTHON ?= python3
APT_PACKAGES = qemu-system-x86 qemu-utils e2fsprogs cpio python3 zstd iproute2 nftables
N ?= 10
# QEMU=backports installs QEMU 10 from bookworm-backports (children then open memory.bin read-only).
QEMU ?= bookworm
BACKPORTS_LIST = /etc/apt/sources.list.d/forkd-bookworm-backports.list

.PHONY: demo deps apt pip compat-venv openapi image snapshot test test-unit lint bench clean

demo: deps image snapshot
	forkd fork --tag pyagent -n $(N) --eval 'numpy.zeros(5).tolist()'

deps: apt pip compat-venv e2b-venv ts

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

pip:
	$(PYTHON) -m pip install -q -e '.[dev]'

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
	forkd-controller openapi --out docs/openapi.json

image:
	forkd image build

snapshot:
	@forkd snapshot info pyagent >/dev/null 2>&1 || forkd snapshot create --tag pyagent

test:
	$(PYTHON) -m pytest -ra

test-unit:
	$(PYTHON) -m pytest -ra tests/unit

lint:
	ruff check src tests bench
	mypy
	$(MAKE) lint-ts

bench:
	$(PYTHON) bench/fanout.py

clean:
	forkd cleanup
