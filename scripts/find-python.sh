#!/usr/bin/env bash
# The Python `make` uses by default: the newest one on this machine that the current stack supports (Python 3.12:
# lerobot 0.6 needs >= 3.12; 3.12 is the version tested). Looks on PATH, then in pyenv's versions (a pyenv shim
# for a version that is not active fails, so the interpreter is taken from its folder). None found: python3,
# which on Python 3.11 installs the previous stack (lerobot 0.4.4, transformers 4.5x).
set -u
supported() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; }
candidates=(python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12)
if command -v pyenv >/dev/null 2>&1; then
  candidates+=("$(pyenv root)"/versions/3.12*/bin/python3.12)
fi
for p in "${candidates[@]}"; do
  if supported "$p"; then
    command -v "$p" 2>/dev/null || echo "$p"
    exit 0
  fi
done
echo python3
