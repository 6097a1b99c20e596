#!/usr/bin/env bash
# The Grenache tutorial's "usage behind NAT" story in a small lab of real Linux
# NATs: a public host runs a DHT node and the fibonacci consumer; a worker in a
# home behind a port-restricted NAT (plain Linux SNAT, like most home routers)
# punches the consumer, and the consumer calls it back through the hole.
# Then a caller in a second home, behind a second NAT, reaches the same worker:
# the DHT node's introducer tells both sides about each other and they punch
# at once. Last, the second router turns symmetric (random ports), a pair plain
# punching cannot join: the introducer has both sides birthday-punch (256
# sockets on one side, random-port probes on the other) and the call gets
# through all the same. Last of all the worker's router turns symmetric too,
# a pair no punching can join, and the introducer relays the call (the relay
# sees only the encrypted session).
#
# Needs root, iproute2 and nftables (apt-get install -y nftables iproute2).
# Build first: cargo xtask plugins && cargo build -p grenache-host
# Everything it creates (namespaces ghx-*) is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST:-target/debug/grenache-host}
SECONDS_TO_WATCH=${SECONDS_TO_WATCH:-6}
[ "$(id -u)" = 0 ] || { echo "run me as root: I build network namespaces and a NAT router" >&2; exit 2; }
command -v nft >/dev/null || { echo "nft is missing: apt-get install -y nftables" >&2; exit 2; }
[ -x "$HOST" ] && [ -f plugins/fibonacci.wasm ] || { echo "build first: cargo xtask plugins && cargo build -p grenache-host" >&2; exit 2; }

P=ghx-; PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in home2 router2 home router pub inet; do ip netns del "$P$ns" 2>/dev/null || true; done
  # The logs stay when something failed (the message names them).
  if [ "$OK" = 1 ] && [ -n "$LOG" ]; then rm -rf "$LOG"; fi
}
trap cleanup EXIT
LOG=; OK=0
inns() { local ns=$1; shift; ip netns exec "$P$ns" "$@"; }
# Starts a program in a namespace in the background; `ip netns exec` execs it,
# so $! is the program itself and cleanup can stop it.
bg_in() { local ns=$1 log=$2; shift 2; ip netns exec "$P$ns" "$@" >"$log" 2>&1 & PIDS+=($!); }
# Waits up to 20 s for a line containing $2 in log $1.
wait_for() { for _ in $(seq 200); do grep -q "$2" "$1" && return 0; sleep 0.1; done; echo "!! no \"$2\" in $1 after 20 s" >&2; exit 1; }
# The worker's RPC socket: the same port both times, so the DHT holds one
# address for it, not a stale one from the first run.
WORKER=10.0.1.2:40000

echo "== building the lab: internet 203.0.113.0/24, router 203.0.113.2 (port-restricted NAT), home 10.0.1.0/24"
for ns in inet pub router home; do ip netns add "$P$ns"; inns "$ns" ip link set lo up; done
inns inet ip link add br0 type bridge; inns inet ip link set br0 up
ip link add eth0 netns "${P}pub" type veth peer name pub netns "${P}inet"
ip link add wan netns "${P}router" type veth peer name router netns "${P}inet"
ip link add lan netns "${P}router" type veth peer name eth0 netns "${P}home"
inns inet ip link set pub master br0 up; inns inet ip link set router master br0 up
inns pub ip addr add 203.0.113.10/24 dev eth0; inns pub ip link set eth0 up
inns router ip addr add 203.0.113.2/24 dev wan; inns router ip addr add 10.0.1.1/24 dev lan
inns router ip link set wan up; inns router ip link set lan up
inns router sysctl -qw net.ipv4.ip_forward=1
inns home ip addr add 10.0.1.2/24 dev eth0; inns home ip link set eth0 up
inns home ip route add default via 10.0.1.1
# The firewall of a home router ($1: its namespace); filtering per docs/nat-lab.md.
firewall() { inns "$1" nft -f - <<'NFT'
table inet fw {
  chain input { type filter hook input priority filter; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" meta l4proto icmp accept
    iifname "wan" drop; }
  chain forward { type filter hook forward priority filter; policy drop;
    iifname "lan" oifname "wan" accept
    iifname "wan" oifname "lan" ct state established,related accept; }
}
NFT
}
# Source NAT ($1: namespace, $2: public address, $3: "" for port-restricted
# cone, "fully-random" for symmetric).
snat() { inns "$1" nft -f - <<NFT
table ip nat {
  chain prerouting { type nat hook prerouting priority dstnat; }
  chain postrouting { type nat hook postrouting priority srcnat; oifname "wan" snat ip to $2 $3; }
}
NFT
}
firewall router; snat router 203.0.113.2 ""

LOG=$(mktemp -d)
echo "== public host: DHT node and fibonacci_consumer"
bg_in pub "$LOG/dht" "$HOST" dht --listen 203.0.113.10:20001
sleep 0.5
bg_in pub "$LOG/consumer" "$HOST" run plugins/consumer.wasm --listen 203.0.113.10:0 --bootstrap 203.0.113.10:20001 --control off

echo "== a plain call into the home, before the worker punches (the NAT must drop it)"
bg_in home "$LOG/quiet" "$HOST" run plugins/fibonacci.wasm --listen $WORKER --bootstrap 203.0.113.10:20001 --control off
QUIET=$!
wait_for "$LOG/quiet" "announced fibonacci_worker"
if inns pub "$HOST" call fibonacci_worker '{"length":10}' --bootstrap 203.0.113.10:20001 --timeout-ms 2000 2>&1 | sed 's/^/   call | /'; then
  echo "!! the call got through an unpunched NAT: this lab is not filtering"
else
  echo "   (refused, as a home router should)"
fi
kill "$QUIET"

echo "== the worker behind NAT, with --behind-nat: it punches fibonacci_consumer every second"
wait "$QUIET" 2>/dev/null || true
bg_in home "$LOG/worker" "$HOST" run plugins/fibonacci.wasm --listen $WORKER --bootstrap 203.0.113.10:20001 --behind-nat --control off --log-level info,requests=debug
WORKER_PID=$!
sleep "$SECONDS_TO_WATCH"
echo "-- consumer (public):"; grep -E "punch from|got data reply|failed" "$LOG/consumer" | sed 's/^/   /' | head -8
echo "-- worker (behind NAT, seen from outside as 203.0.113.2):"; grep -E "request for" "$LOG/worker" | sed 's/^/   /' | head -4
if grep -q "got data reply, sequence is: \[1,1,2,3,5,8,13,21,34,55\]" "$LOG/consumer"; then
  echo "== it works: the consumer reached the worker through the hole the worker punched"
else
  echo "!! the consumer got no reply; logs in $LOG"; exit 1
fi

echo "== a second home: router 203.0.113.3 (port-restricted NAT), home 10.0.2.0/24"
for ns in router2 home2; do ip netns add "$P$ns"; inns "$ns" ip link set lo up; done
ip link add wan netns "${P}router2" type veth peer name router2 netns "${P}inet"
ip link add lan netns "${P}router2" type veth peer name eth0 netns "${P}home2"
inns inet ip link set router2 master br0 up
inns router2 ip addr add 203.0.113.3/24 dev wan; inns router2 ip addr add 10.0.2.1/24 dev lan
inns router2 ip link set wan up; inns router2 ip link set lan up
inns router2 sysctl -qw net.ipv4.ip_forward=1
inns home2 ip addr add 10.0.2.2/24 dev eth0; inns home2 ip link set eth0 up
inns home2 ip route add default via 10.0.2.1
firewall router2; snat router2 203.0.113.3 ""

echo "== a call from the second home: both sides are behind NATs, the DHT node's introducer introduces them"
inns home2 "$HOST" call fibonacci_worker '{"length":10}' --bootstrap 203.0.113.10:20001 2>&1 | sed 's/^/   call | /'

echo "== the second router turns symmetric (a new random port per destination): plain punching cannot meet a port-restricted NAT, birthday punching can"
inns router2 nft delete table ip nat; inns router2 conntrack -F 2>/dev/null || true
snat router2 203.0.113.3 fully-random
if ! inns home2 "$HOST" call fibonacci_worker '{"length":10}' --bootstrap 203.0.113.10:20001 --log-level info 2>&1 | sed 's/^/   call | /'; then
  echo "!! birthday punching did not get the call through"; exit 1
fi

echo "== the worker's router turns symmetric too: no punch can meet; the DHT node's introducer relays the call (encrypted end to end)"
inns router nft delete table ip nat; inns router conntrack -F 2>/dev/null || true
snat router 203.0.113.2 fully-random
# A host measures its NAT at start: the worker starts again to learn the new one.
kill "$WORKER_PID"; wait "$WORKER_PID" 2>/dev/null || true
bg_in home "$LOG/worker2" "$HOST" run plugins/fibonacci.wasm --listen $WORKER --bootstrap 203.0.113.10:20001 --behind-nat --control off --log-level info,requests=debug
wait_for "$LOG/worker2" "announced fibonacci_worker"
wait_for "$LOG/worker2" "behind a symmetric NAT"
if ! inns home2 "$HOST" call fibonacci_worker '{"length":10}' --bootstrap 203.0.113.10:20001 --log-level info 2>&1 | sed 's/^/   call | /'; then
  echo "!! the relay did not get the call through"; exit 1
fi
echo "-- worker:"; grep -E "relayed by|request for" "$LOG/worker2" | sed 's/^/   /' | head -4
OK=1
echo "== done"
