# Two commands do everything on a fresh machine:
#   make demo   - set up, then run the whole data path locally (MCP server, Envoy, extension server, agent)
#   make test   - set up, then lint, type-check and run the whole test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# The TypeScript external stage example: its own package.json/lock, compiled with tsc.
TS_STAGE := examples/external-ts/dist/stage.js

.PHONY: demo test lint unit integration bench venv node stage-package clean crds chromium

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# xds-protos (Envoy's protos) ships older copies of opentelemetry/proto/*; whichever package
	# pip installed last wins. The OTLP exporter needs opentelemetry-proto's own.
	$(BIN)/pip install --quiet --no-deps --force-reinstall "opentelemetry-proto==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	touch $@

node: node_modules/.installed $(TS_STAGE)
# Playwright MCP never downloads a browser: the tests run it on Debian's chromium.
node_modules/.installed: package.json package-lock.json
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(TS_STAGE): examples/external-ts/package.json examples/external-ts/package-lock.json examples/external-ts/tsconfig.json examples/external-ts/src/stage.ts
	cd examples/external-ts && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build

# The browser the real Playwright MCP drives in tests/integration/test_playwright.py:
# Debian's chromium, installed (without recommends) when it is missing.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium: $(CHROMIUM)
$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

# The example in-process stage package, installed like any third-party stage (found by entry point).
stage-package: $(VENV)/.stage-package
$(VENV)/.stage-package: $(VENV)/.installed examples/stage-package/pyproject.toml examples/stage-package/mcp_stage_example/*.py
	$(BIN)/pip install --quiet --no-deps --force-reinstall ./examples/stage-package
	touch $@

demo: venv
	$(BIN)/python examples/demo.py

lint: venv stage-package
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy --strict examples/stage-package/mcp_stage_example examples/stage-package/tests
	$(BIN)/lint-imports

test: venv node chromium stage-package lint conformance
	$(BIN)/pytest

# The MCP conformance suite (pinned in package.json, run on the Node.js of the `node` npm
# package) against each upstream directly and through `mcp-extproc up`: every scenario that
# passes directly must pass through the gateway (docs/conformance.md); the Python SDK
# fixture again through an MCPVirtualServer of its own (docs/virtual-servers.md).
.PHONY: conformance
conformance: venv node
	$(BIN)/python -m tests.conformance.run
	$(BIN)/python -m tests.conformance.run --target py-legacy --target py-modern --via-virtual

unit: venv
	$(BIN)/pytest tests/unit

integration: venv node chromium stage-package
	$(BIN)/pytest tests/integration

# The memory measurement runs the gateway from a venv holding only the runtime dependencies,
# as users install it (the dev tools make httpx import its CLI: click, rich, pygments).
RUNTIME_VENV ?= .venv-runtime
$(RUNTIME_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/pip install --quiet --upgrade pip
	$(RUNTIME_VENV)/bin/pip install --quiet .
	rm -rf build
	touch $@

bench: venv $(RUNTIME_VENV)/.installed
	command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.keeper --sessions 1000 --window 10 --server-python $(RUNTIME_VENV)/bin/python

crds: venv
	$(BIN)/python -m controller.render.crds deploy/crds

clean:
	rm -rf $(VENV) $(RUNTIME_VENV) node_modules examples/external-ts/node_modules examples/external-ts/dist .pytest_cache .mypy_cache .ruff_cache *.egg-info
