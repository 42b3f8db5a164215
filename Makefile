# facedoor developer entry points. `make demo` and `make test` are the README's quick start.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODELS ?= models
# Photos of people the demo does not enrol (LFW from ../shared when it is there).
STRANGERS ?= $(wildcard ../shared/data/faces/lfw10)

.PHONY: venv mosquitto models demo docs lint test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[export,stylize,bench,test]'
	touch $@

# Debian's Mosquitto broker and clients (tests, demo), systemd-analyze (unit test, package `systemd`),
# g++ and mbedtls (the ESPHome example's signature check, built and run by the tests).
mosquitto:
	@{ command -v mosquitto && command -v mosquitto_sub && command -v systemd-analyze && command -v g++ \
	   && test -f /usr/include/mbedtls/md.h; } >/dev/null 2>&1 || { \
	  echo "installing Debian's mosquitto, mosquitto-clients, systemd (systemd-analyze), g++ and libmbedtls-dev"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients \
	    systemd g++ libmbedtls-dev >/dev/null; }

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

test: venv mosquitto lint
	$(BIN)/pytest

bench: venv
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(MODELS) .pytest_cache
