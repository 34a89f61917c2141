#!/usr/bin/env bash
# The demo: set up .venv, then run the classifier benchmark on CPU (grows into the full job).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
distrib-face bench classifier --classes 20000 --batch 128 --embedding 512 --world-size 2
