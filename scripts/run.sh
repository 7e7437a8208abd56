#!/usr/bin/env bash
# The main job: set the machine up (idempotent), then run a pyvhost net backend serving DPDK
# testpmd's virtio-user as a real frontend, with live statistics. Arguments go to the demo
# (e.g. --seconds 30, --metadata-access copy, --packet-size 1518).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pyvhost.demo "$@"
