#!/bin/sh
# Build VENV with Home Assistant Core from PyPI for tests/test_homeassistant_live.py. The default,
# $XDG_CACHE_HOME/facedoor/hass-venv (~/.cache/...), outlives clones: a fresh checkout (CI) reuses
# it, and it is rebuilt only when this script or the Python found changes (its .installed key).
#
# Home Assistant 2025.4 needs Python 3.13, 2024.12 runs on 3.12 (both have the device-based MQTT
# discovery the door uses); the first Python found decides. Every package is pinned by Home
# Assistant's own package_constraints.txt (no resolver backtracking), plus the requirements of the
# integrations the test loads (frontend, mqtt), so HA runs with --skip-pip and never installs at run
# time. Without a suitable Python this prints why and leaves no venv: the live tests then skip.
set -eu
venv=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/facedoor/hass-venv}

python=""
version=""
# HASS_CANDIDATES="python3.12:2024.12.5" tries the fallback alone.
for candidate in ${HASS_CANDIDATES:-python3.13:2025.4.4 python3.12:2024.12.5}; do
  exe=${candidate%%:*}
  for path in "$(command -v "$exe" 2>/dev/null || true)" "$HOME"/.pyenv/versions/"${exe#python}".*/bin/"$exe"; do
    if [ -x "$path" ] && "$path" -c 'import ssl, sqlite3, venv' 2>/dev/null; then
      python=$path
      version=${candidate#*:}
      break 2
    fi
  done
done
if [ -z "$python" ]; then
  echo "hass-venv: no Python 3.13 or 3.12 found (PATH or pyenv); the live Home Assistant tests will skip"
  exit 0
fi

key="$version $python $(cksum < "$0" | cut -d' ' -f1)"
if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$key" ]; then
  echo "hass-venv: Home Assistant $version in $venv is up to date"
  exit 0
fi
echo "hass-venv: installing Home Assistant $version on $python into $venv"
start=$(date +%s)
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv/bin/pip" download -q --no-deps -d "$work" "homeassistant==$version"
"$venv/bin/python" -c 'import sys, zipfile; sys.stdout.write(zipfile.ZipFile(sys.argv[1]).read("homeassistant/package_constraints.txt").decode())' \
  "$work"/homeassistant-*.whl > "$work/constraints.txt"
# frontend (loaded by every HA: onboarding, config API) and mqtt: versions come from the constraints
"$venv/bin/pip" install -q -c "$work/constraints.txt" "$work"/homeassistant-*.whl home-assistant-frontend paho-mqtt
# HA's camera support imports libturbojpeg when a camera loads; Debian's package, when apt is there
if ! ldconfig -p 2>/dev/null | grep -q libturbojpeg && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libturbojpeg0 >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libturbojpeg0 >/dev/null; }
fi
echo "$key" > "$venv/.installed"
echo "hass-venv: installed in $(( $(date +%s) - start )) s"
