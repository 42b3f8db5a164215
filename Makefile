# facedoor developer entry points. `make demo` and `make test` are the README's quick start.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODELS ?= models
# Home Assistant Core for tests/test_homeassistant_live.py (its own venv: it needs Python 3.13 or 3.12),
# kept in the user's cache so that fresh clones reuse it.
HASS_VENV ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/facedoor/hass-venv
# Photos of people the demo does not enrol (LFW from ../shared when it is there).
STRANGERS ?= $(wildcard ../shared/data/faces/lfw10)

.PHONY: venv hass-venv mosquitto models demo docs lint test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[export,stylize,bench,web,test]'
	touch $@

# Home Assistant from PyPI, pinned by its own constraints; a no-op when up to date; no venv (the
# live tests skip) without Python 3.13/3.12.
hass-venv:
	sh tests/hass/install.sh $(HASS_VENV)

# Debian's Mosquitto broker and clients (tests, demo), systemd-analyze (unit test, package `systemd`),
# g++ and mbedtls (the ESPHome example's signature check, built and run by the tests), and Chromium
# (the web console's browser tests; Playwright drives it, no browser is downloaded).
mosquitto:
	@{ command -v mosquitto && command -v mosquitto_sub && command -v systemd-analyze && command -v g++ \
	   && test -f /usr/include/mbedtls/md.h; } >/dev/null 2>&1 || { \
	  echo "installing Debian's mosquitto, mosquitto-clients, systemd (systemd-analyze), g++ and libmbedtls-dev"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients \
	    systemd g++ libmbedtls-dev >/dev/null; }
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium (web console browser tests)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: the browser tests will skip"; }

models: venv
	$(BIN)/facedoor-export --out $(MODELS)

demo: venv mosquitto
	$(BIN)/facedoor --models $(MODELS) demo $(if $(STRANGERS),--strangers $(STRANGERS))

# Generated reference texts (tests fail when they are out of date).
docs: venv
	$(BIN)/facedoor config example -o config/facedoor.yaml
	$(BIN)/facedoor schema decision -o docs/decision.schema.json

lint: venv
	$(BIN)/ruff check daemon export stylize tests benchmarks
	$(BIN)/mypy

test: venv hass-venv mosquitto lint
	FACEDOOR_HASS_VENV=$(HASS_VENV) $(BIN)/pytest

bench: venv
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(MODELS) .pytest_cache
