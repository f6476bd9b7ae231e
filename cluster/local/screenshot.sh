#!/usr/bin/env bash
# Reproduce docs/dashboard-actors.png: start a local two-node cluster (own token, own temp dir,
# dashboard on 127.0.0.1), submit a search as a Ray job, screenshot the dashboard's actors page
# while the evaluator actors run, wait for the job, stop exactly that cluster.
# Needs the Debian package chromium. Usage: cluster/local/screenshot.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-docs/dashboard-actors.png}
TMP=$(mktemp -d /tmp/cullmt-shot-XXXXXX)
cleanup() { python cluster/local/local_cluster.py stop --temp-dir "$TMP/ray" >/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
(umask 077; python -c "import secrets; print(secrets.token_hex(32))" > "$TMP/token")
RAY_AUTH_TOKEN=$(cat "$TMP/token")   # this cluster's token; ~/.ray/auth_token is left alone
export RAY_AUTH_TOKEN HF_HUB_OFFLINE=1
python cluster/local/local_cluster.py start --temp-dir "$TMP/ray" --cpus 2 --dashboard-port 0
DASH=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['dashboard'])" "$TMP/ray/cluster.json")
SID=cullmt-screenshot-$$
python -m cullmt_ray.cli submit --address "$DASH" --submission-id "$SID" -- search --max-sentences 40 \
  --target-removed 2 --actors 2 --set resources.placement=spread --output "$TMP/runs" --store "$TMP/store.sqlite"
python cluster/local/screenshot.py --dashboard "$DASH" --page actors --wait-alive 2 --out "$OUT"
python -m cullmt_ray.cli submit --address "$DASH" --attach "$SID" --follow | tail -n 3
