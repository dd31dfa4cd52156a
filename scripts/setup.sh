#!/usr/bin/env bash
# Installs everything vibecast needs on a fresh Debian machine, and does nothing when it is already
# there: system packages (apt-get), a virtual environment in .venv, Python packages pinned by
# constraints.txt, and the browser demo's one front-end dependency (npm ci).
#   scripts/setup.sh          what the server needs
#   scripts/setup.sh --test   also what the test suite needs (chromium, pytest, playwright, ruff,
#                             mypy)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_packages=(libopus0 opus-tools)
[ "$want_test" = 1 ] && apt_packages+=(chromium curl redis-server)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing system packages: ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi

# Re-run pip only when what it installs from has changed (a test install covers the plain one).
extras=""
[ "$want_test" = 1 ] && extras="[test]"
stamp=".venv/.vibecast-setup$extras"
digest=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ] && [ "$(cat ".venv/.vibecast-setup[test]" 2>/dev/null)" != "$digest" ]; then
  echo "setup: installing Python packages"
  .venv/bin/python -m pip install -q --upgrade pip
  # The CPU build of torch 2.13.0 is on the machine; any other torch pulls gigabytes of CUDA.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".$extras"
  echo "$digest" > "$stamp"
fi

# The page's fallback Opus decoder for browsers without WebCodecs (see web_demo/README.md).
if command -v npm >/dev/null 2>&1; then
  lock_digest=$(sha256sum web_demo/package-lock.json | cut -d' ' -f1)
  if [ "$(cat web_demo/node_modules/.vibecast-setup 2>/dev/null)" != "$lock_digest" ]; then
    echo "setup: installing the page's npm packages"
    (cd web_demo && npm ci --silent --no-audit --no-fund)
    echo "$lock_digest" > web_demo/node_modules/.vibecast-setup
  fi
else
  echo "setup: npm not found; the page will play only where the browser has WebCodecs" >&2
fi
