#!/usr/bin/env bash
# Three agentmesh nodes on loopback sharing one Redis, as they would run behind a load
# balancer: ports 7701-7703, key prefix "demo". Stop them with Ctrl-C.
#
#   examples/three-nodes.sh [redis://127.0.0.1:6379]
set -euo pipefail
cd "$(dirname "$0")/.."
redis=${1:-redis://127.0.0.1:6379}
cargo build --release -p agentmesh
bin=./target/release/agentmesh
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for n in 1 2 3; do
  "$bin" serve --listen "127.0.0.1:770$n" --store "$redis" \
    --set store.key_prefix=demo --set "store.node_id=node-$n" \
    --data-dir "./agentmesh-data/node-$n" &
  pids+=($!)
done
echo "nodes on 127.0.0.1:7701, :7702 and :7703 (Redis $redis); Ctrl-C stops them"
wait
