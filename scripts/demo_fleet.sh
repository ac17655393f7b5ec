#!/usr/bin/env bash
# make demo-fleet: a real fedge deployment on loopback, through the fedge command only.
#
# A server (SuperLink on loopback, TLS gateway, coordinator) and three enrolled devices,
# each a SuperNode with a long-running ClientApp on its own Fashion-MNIST examples, run
# three secure rounds with sample-level DP (DP-SGD at epsilon 3 on each device under
# SecAgg+). Then one device is revoked and shown refused. Everything lives in
# runs/demo-fleet (FEDGE_HOME included); every process is stopped on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
FEDGE="${FEDGE:-.venv/bin/fedge}"
PYTHON="${PYTHON:-.venv/bin/python}"
ROOT="${DEMO_FLEET_DIR:-runs/demo-fleet}"
SERVER="$ROOT/server"
DEVICES=(alpha bravo charlie)
export FEDGE_HOME="$PWD/$ROOT/home"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
step() { printf '\n--- %s\n' "$*"; }
wait_gateway() {
  local url="$1" i
  for i in $(seq 1 120); do
    if "$PYTHON" -c 'import sys, httpx; httpx.get(sys.argv[1] + "/v1/fedge/ca.pem", verify=False, timeout=2).raise_for_status()' "$url" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  echo "the gateway did not answer; see $SERVER/logs and $ROOT/server.log" >&2
  return 1
}

rm -rf "$ROOT"
mkdir -p "$ROOT/data" "$ROOT/devices"
gateway_port=$(free_port)

step "data: each device's own 1000 Fashion-MNIST examples; the server's held-out 500"
for i in "${!DEVICES[@]}"; do
  "$FEDGE" sim samples --count 1000 --offset $((i * 1000)) --out "$ROOT/data/${DEVICES[$i]}.npz"
done
"$FEDGE" sim samples --count 500 --offset 8000 --out "$ROOT/data/eval.npz"

step "fedge server init (prints the CA fingerprint devices pin)"
"$FEDGE" server init "$SERVER" --san localhost --address "127.0.0.1:$gateway_port" \
  --eval-data "$ROOT/data/eval.npz"
config="$SERVER/fedge-server.toml"
# The edits an operator makes by hand: free ports, three devices, sample-level DP.
sed -i \
  -e "s|^superlink_port = .*|superlink_port = $(free_port)|" \
  -e "s|^metrics_address = .*|metrics_address = \"127.0.0.1:$(free_port)\"|" \
  -e 's|^rounds = .*|rounds = 3|' \
  -e 's|^min_clients = .*|min_clients = 3|' \
  -e 's|^clients_per_round = .*|clients_per_round = 3|' \
  -e 's|^round_timeout_s = .*|round_timeout_s = 120.0|' \
  -e 's|^batch_size = .*|batch_size = 64|' \
  -e 's|^learning_rate = .*|learning_rate = 0.1|' \
  -e 's|^mode = .*|mode = "sample"|' \
  -e 's|^epsilon = .*|epsilon = 3.0|' \
  "$config"
grep -E '^\[|^(rounds|clients_per_round|mode|epsilon|threat_model) =' "$config"

step "fedge server start (SuperLink on loopback, gateway on :$gateway_port, coordinator)"
"$FEDGE" server start "$SERVER" --exit-when-done >"$ROOT/server.log" 2>&1 &
server=$!
pids+=("$server")
url="https://localhost:$gateway_port"
wait_gateway "$url"

step "fedge server token create: one-time tokens"
tokens=$("$FEDGE" server token create "$SERVER" --count 3 --expires 1h --json)
echo "$tokens" | "$PYTHON" -c 'import json, sys; d = json.load(sys.stdin); print("ca", d["ca_fingerprint"], "expires", d["expires_at"])'
fingerprint=$(echo "$tokens" | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["ca_fingerprint"])')

step "fedge client enroll: each device makes its own keys and installs its policy"
for i in "${!DEVICES[@]}"; do
  token=$(echo "$tokens" | "$PYTHON" -c "import json, sys; print(json.load(sys.stdin)['tokens'][$i])")
  "$FEDGE" client enroll --server "$url" --token "$token" --ca-fingerprint "$fingerprint" \
    --dir "$ROOT/devices/${DEVICES[$i]}" --lifetime-epsilon 20
done

step "fedge client start x3; three secure rounds with DP-SGD on every device (a minute or two)"
for name in "${DEVICES[@]}"; do
  "$FEDGE" client start --data "$ROOT/data/$name.npz" --dir "$ROOT/devices/$name" \
    --runtime-port "$(free_port)" >"$ROOT/$name.log" 2>&1 &
  pids+=("$!")
done
status=0
wait "$server" || status=$?
if [ "$status" -ne 0 ]; then
  tail -n 30 "$ROOT/server.log" >&2
  exit "$status"
fi
tail -n 1 "$ROOT/server.log"
summary=$(ls "$SERVER"/runs/*/summary.json)
"$PYTHON" - "$summary" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"run {s['run_id']}: {s['status']}; accuracy before training {s['initial_accuracy']:.3f}")
for r in s["rounds"]:
    sa = r["secure_aggregation"]
    print(f"  round {r['round']}: accuracy {r['accuracy']:.3f}  {r['seconds']:.1f} s  "
          f"SecAgg+ {sa['survivors']}/{sa['sampled']} (k={sa['degree']}, t={sa['threshold']})")
EOF
for name in "${DEVICES[@]}"; do
  ledger=$(ls "$ROOT/devices/$name/ledger/"device-*.jsonl)
  echo "  $name's own ledger: $(wc -l <"$ledger") rounds in $(basename "$ledger")"
done

step "fedge server nodes"
"$FEDGE" server nodes "$SERVER"

revoked_id=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["device_id"])' \
  "$ROOT/devices/charlie/device.json")
step "fedge server revoke $revoked_id (charlie: lost)"
"$FEDGE" server revoke "$revoked_id" --dir "$SERVER" --reason lost
# Stop the devices; start the server again (a new run waits for devices) to show the refusal.
for pid in "${pids[@]:1}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
"$FEDGE" server start "$SERVER" --exit-when-done >>"$ROOT/server.log" 2>&1 &
pids+=("$!")
wait_gateway "$url"
step "charlie tries to come back: fedge client start (refused)"
if "$FEDGE" client start --data "$ROOT/data/charlie.npz" --dir "$ROOT/devices/charlie" \
  --runtime-port "$(free_port)" >"$ROOT/charlie-revoked.log" 2>&1; then
  echo "charlie was NOT refused" >&2
  exit 1
fi
tail -n 1 "$ROOT/charlie-revoked.log"
grep -m1 "Failed to activate SuperNode" "$ROOT/devices/charlie/logs/supernode.log" || true
step "fedge server nodes"
"$FEDGE" server nodes "$SERVER"
cleanup  # the waiting run is recorded as interrupted
pids=()

step "fedge audit list --last 6"
"$FEDGE" audit list --home "$SERVER" --last 6 | cut -c1-160
step "fedge audit verify"
"$FEDGE" audit verify --home "$SERVER"
step "fedge audit report --fleet (both runs: HTML; the first run's report as PDF)"
"$FEDGE" audit report --home "$SERVER" --fleet --format html --out "$ROOT/fleet-report.html"
first_run=$(ls "$SERVER/runs" | sort | head -n 1)
"$FEDGE" audit report --home "$SERVER" --run "$first_run" --format pdf --out "$ROOT/run-report.pdf"
echo
echo "demo-fleet: everything is in $ROOT (server logs in $SERVER/logs)"
