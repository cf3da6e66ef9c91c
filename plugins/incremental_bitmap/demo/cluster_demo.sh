#!/usr/bin/env bash
# The cluster demo: 3 etcd members on loopback (free ports, temporary data dirs, short
# elections) and 3 taosX hosts shipping the same backup set under shared idempotency keys
# through the plugin's etcd state store. The etcd leader is SIGKILLed mid-run. The summary
# counts each block's copies over the 3 hosts' work dirs: exactly one each, or the demo fails.
#
# usage: cluster_demo.sh HOST_BINARY PLUGIN_LIBRARY DEMO_DIR [FILES [SIZE]]
# Everything it writes lives under DEMO_DIR (emptied first); every etcd member and host it
# starts is stopped by pid when it exits, however it exits.
set -euo pipefail

host_bin=$1 lib=$2 dir=$3 files=${4:-300} size=${5:-4096}
here=$(cd "$(dirname "$0")" && pwd)
for tool in etcd etcdctl python3; do
    command -v "$tool" >/dev/null || { echo "cluster demo: $tool is missing (Debian: etcd-server, etcd-client, python3)" >&2; exit 2; }
done

etcd_pids=() host_pids=()
stop_all() {
    for pid in "${host_pids[@]}" "${etcd_pids[@]}"; do
        [ -n "$pid" ] || continue
        kill -CONT "$pid" 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap stop_all EXIT
trap 'exit 130' INT TERM

rm -rf "$dir" && mkdir -p "$dir/plugins" "$dir/etcd"
# A link to the library cargo built, not a copy (the hosts dlopen it from this plugin dir).
ln -s "$(realpath "$lib")" "$dir/plugins/libbackup_coordinator.so"

# Six free loopback ports: a client and a peer port per member.
read -r -a ports <<<"$(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')"
client=() peer=() cluster=""
for i in 0 1 2; do
    client[i]="http://127.0.0.1:${ports[2*i]}"
    peer[i]="http://127.0.0.1:${ports[2*i+1]}"
    cluster+="${cluster:+,}m$i=${peer[i]}"
done
endpoints=$(IFS=,; echo "${client[*]}")
etcdctl_on() { ETCDCTL_API=3 etcdctl --endpoints="$1" --command-timeout=2s "${@:2}"; }

for i in 0 1 2; do
    etcd --name "m$i" --data-dir "$dir/etcd/m$i" \
        --listen-client-urls "${client[i]}" --advertise-client-urls "${client[i]}" \
        --listen-peer-urls "${peer[i]}" --initial-advertise-peer-urls "${peer[i]}" \
        --initial-cluster "$cluster" --initial-cluster-state new \
        --initial-cluster-token backup-cluster-demo \
        --heartbeat-interval 50 --election-timeout 300 \
        --logger zap --log-level warn >"$dir/etcd/m$i.log" 2>&1 &
    etcd_pids[i]=$!
done
for _ in $(seq 300); do
    etcdctl_on "$endpoints" endpoint health >/dev/null 2>&1 && break
    sleep 0.1
done
health=$(etcdctl_on "$endpoints" endpoint health 2>&1) || { echo "$health" >&2; echo "etcd cluster not healthy; logs in $dir/etcd" >&2; exit 1; }
echo "etcd: 3 members at $endpoints (pids ${etcd_pids[*]})"

# The demo config with the etcd state store in the plugin's section.
sed -e '/^idempotency_lease/d' \
    -e "/^\[plugins.incremental_bitmap\]/a state_backend = \"etcd\"\netcd_endpoints = [\"${endpoints//,/\", \"}\"]\netcd_prefix = \"/taosx/cluster-demo/\"\netcd_timeout = \"5s\"\nidempotency_lease = \"5s\"" \
    "$here/taosx.toml" >"$dir/cluster.toml"

for i in 0 1 2; do
    peers=""
    for j in 0 1 2; do [ "$j" = "$i" ] || peers+="${peers:+:}$dir/host$j"; done
    "$host_bin" --config "$dir/cluster.toml" --plugin-dir "$dir/plugins" --work-dir "$dir/host$i" \
        --files "$files" --size "$size" --failure-rate 0.1 --threads 3 --peers "$peers" \
        >"$dir/host$i.out" 2>&1 &
    host_pids[i]=$!
done
echo "hosts: 3 taosX hosts shipping the same $files blocks (pids ${host_pids[*]})"

written() { { find "$dir"/host*/backup_set -name '*.dat' 2>/dev/null || true; } | wc -l; }
hosts_running() { for pid in "${host_pids[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }

# Mid-run: once a third of the blocks are written, SIGKILL the member that leads now.
while hosts_running && [ "$(written)" -lt $((files / 3)) ]; do sleep 0.02; done
leader=""
for i in 0 1 2; do
    # "127.0.0.1:port, id, version, db size, is leader, ..."
    if etcdctl_on "${client[i]}" endpoint status 2>/dev/null | awk -F', ' '$5 == "true" {found=1} END {exit !found}'; then
        leader=$i
    fi
done
[ -n "$leader" ] || { echo "no etcd leader found" >&2; exit 1; }
at=$(written)
kill -KILL "${etcd_pids[leader]}"
wait "${etcd_pids[leader]}" 2>/dev/null || true
etcd_pids[leader]=""
mid_run=yes
hosts_running || mid_run="no (the hosts had already finished)"
echo "etcd: leader m$leader SIGKILLed with $at of $files blocks written; mid-run: $mid_run"

status=0
for i in 0 1 2; do
    rc=0
    wait "${host_pids[i]}" || rc=$?
    host_pids[i]=""
    [ "$rc" = 0 ] || { echo "host$i exited $rc; its output: $dir/host$i.out" >&2; status=1; }
done

# Each block's copies over the 3 hosts' work dirs.
once=0 twice=0 missing=0
for ((b = 0; b < files; b++)); do
    name=$(printf 'vg%02d_block_%05d.dat' $((b % 4)) "$b")
    n=0
    for i in 0 1 2; do [ -e "$dir/host$i/backup_set/$name" ] && n=$((n + 1)); done
    case $n in 0) missing=$((missing + 1)) ;; 1) once=$((once + 1)) ;; *) twice=$((twice + 1)); echo "  $name written $n times" ;; esac
done

# A host's counts: first pass (before its restart) and second pass.
count() { awk -v pass="$2" -v key="$3" '$0 ~ /^(first|second) pass$/ {p=$1} p == pass && index($0, "  " key " ") == 1 {for (f = 1; f <= NF; f++) if ($f ~ /^[0-9]+$/) {print $f; exit}}' "$dir/host$1.out"; }
# The larger of the two passes' values (the counters may start again at the re-init).
metric() { awk -v name="$2" '$1 == name && $2 + 0 >= max {max = $2 + 0; seen = 1} END {if (seen) print max}' "$dir/host$1.out"; }

echo
echo "cluster demo summary ($files blocks of $size bytes, 3 hosts, 3 etcd members)"
printf '  %-6s %14s %14s %12s %10s\n' host "written (1st)" "written (2nd)" "replayed" failovers
total_written=0 total_failovers=0
for i in 0 1 2; do
    w1=$(count "$i" first "written by op") w2=$(count "$i" second "written by op")
    r1=$(count "$i" first replayed) r2=$(count "$i" second replayed)
    f=$(metric "$i" backup_state_store_failovers_total)
    printf '  host%-2s %14s %14s %12s %10s\n' "$i" "${w1:-?}" "${w2:-?}" "${r1:-?}+${r2:-?}" "${f:-?}"
    total_written=$((total_written + ${w1:-0} + ${w2:-0}))
    total_failovers=$((total_failovers + ${f:-0}))
done
echo "  blocks written once      $once of $files"
echo "  blocks written twice+    $twice"
echo "  blocks missing           $missing"
echo "  writes by op (all hosts) $total_written"
echo "  etcd failovers           $total_failovers (leader m$leader killed)"
if [ "$twice" != 0 ] || [ "$missing" != 0 ] || [ "$total_written" != "$files" ] || [ "$status" != 0 ]; then
    echo "FAIL: each block must be written exactly once across the hosts; outputs in $dir"
    exit 1
fi
echo "PASS: each of the $files blocks written exactly once across 3 hosts"
