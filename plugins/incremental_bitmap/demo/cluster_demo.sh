#!/usr/bin/env bash
# The cluster demo: 3 etcd members on loopback (free ports, temporary data dirs, short
# elections) and 3 taosX hosts shipping the same backup set under shared idempotency keys
# through the plugin's etcd state store, into one shared destination (DEMO_DIR/shared), each
# block with a fencing token and a fenced write. The etcd leader is SIGKILLed once a third
# of the blocks are written; once half are, one host is SIGSTOPped for the idempotency lease
# + 2 s while ops of its are in their transfer, then SIGCONTed: the others take its keys over
# after the lease, and its late writes are refused by the fence.
#
# The summary reads the shared dir itself: every block present and intact (the content the
# hosts send, fill(i)), no temp file left, each block's fence token the highest accepted;
# and the hosts' fence-log lines (CLOCK_MONOTONIC ns, shared by the processes of this
# machine): per block, no write accepted after a write with a higher token was accepted.
# PASS needs all of that and every host exiting 0.
#
# usage: cluster_demo.sh HOST_BINARY PLUGIN_LIBRARY DEMO_DIR [FILES [SIZE [OP_DELAY_MS]]]
# Everything it writes lives under DEMO_DIR (emptied first); every etcd member and host it
# starts is stopped by pid when it exits, however it exits.
set -euo pipefail

host_bin=$1 lib=$2 dir=$3 files=${4:-300} size=${5:-4096} op_delay=${6:-20}
lease_s=5 stall_s=7 # the idempotency_lease of the config below, and lease + 2 s
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

rm -rf "$dir" && mkdir -p "$dir/plugins" "$dir/etcd" "$dir/shared"
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
    -e "/^\[plugins.incremental_bitmap\]/a state_backend = \"etcd\"\netcd_endpoints = [\"${endpoints//,/\", \"}\"]\netcd_prefix = \"/taosx/cluster-demo/\"\netcd_timeout = \"5s\"\nidempotency_lease = \"${lease_s}s\"" \
    "$here/taosx.toml" >"$dir/cluster.toml"

for i in 0 1 2; do
    peers=""
    for j in 0 1 2; do [ "$j" = "$i" ] || peers+="${peers:+:}$dir/host$j"; done
    "$host_bin" --config "$dir/cluster.toml" --plugin-dir "$dir/plugins" --work-dir "$dir/host$i" \
        --shared-dir "$dir/shared" --op-delay-ms "$op_delay" \
        --files "$files" --size "$size" --failure-rate 0.1 --threads 3 --peers "$peers" \
        >"$dir/host$i.out" 2>&1 &
    host_pids[i]=$!
done
echo "hosts: 3 taosX hosts shipping the same $files blocks into $dir/shared, each transfer ${op_delay} ms (pids ${host_pids[*]})"

written() { { find "$dir/shared/backup_set" -name 'vg*_block_*.dat' 2>/dev/null || true; } | wc -l; }
# A host that exited stays a zombie until waited for: it is not running.
running() { [ -n "$1" ] && [ -e "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]; }
hosts_running() { for pid in "${host_pids[@]}"; do running "$pid" && return 0; done; return 1; }
mono_ns() { python3 -c 'import time; print(time.clock_gettime_ns(time.CLOCK_MONOTONIC))'; }

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

# Whether every thread of a process is stopped (a thread in the middle of an fsync stops
# when it returns from it).
all_stopped() {
    local stat
    for stat in /proc/"$1"/task/*/stat; do
        [ -e "$stat" ] || continue
        case $(sed 's/.*) //' "$stat" 2>/dev/null | cut -d' ' -f1) in T | t | '') ;; *) return 1 ;; esac
    done
}
# The ops of a host in their transfer: a token got, the write not begun ("key token=N").
in_transfer() {
    awk '$1 == "fence-log" && $2 == "transfer" {t[$3 " " $4] = 1}
         $1 == "fence-log" && $2 == "write" {delete t[$3 " " $4]}
         END {for (k in t) print k}' "$dir/host$1.out"
}

# Once half the blocks are written, SIGSTOP a host at a moment some of its ops are in their
# transfer (the host is stopped, its log read; none: it is let go and another moment tried),
# for the lease + 2 s: its keys are taken over, its transfers end after the takers' writes.
while hosts_running && [ "$(written)" -lt $((files / 2)) ]; do sleep 0.02; done
stalled="" transfers=""
for ((attempt = 0; attempt < 300; attempt++)); do
    [ -z "$stalled" ] && hosts_running || break
    i=$((attempt % 3)) pid=${host_pids[attempt % 3]}
    running "$pid" || continue
    kill -STOP "$pid" 2>/dev/null || continue
    for _ in $(seq 500); do all_stopped "$pid" && break; sleep 0.002; done
    transfers=$(in_transfer "$i")
    if [ -n "$transfers" ] && all_stopped "$pid"; then
        stalled=$i
    else
        kill -CONT "$pid"
        sleep 0.003
    fi
done
if [ -n "$stalled" ]; then
    pid=${host_pids[stalled]}
    t_stop=$(mono_ns)
    printf '%s\n' "$transfers" >"$dir/stalled_in_transfer"
    echo "stall: host$stalled pid $pid SIGSTOPped at mono_ns $t_stop with $(written) of $files blocks written, $(wc -l <"$dir/stalled_in_transfer") ops in their transfer: $(cut -d' ' -f1 "$dir/stalled_in_transfer" | xargs -n1 basename | paste -sd' ')"
    sleep "$stall_s"
    t_cont=$(mono_ns)
    kill -CONT "$pid"
    echo "stall: host$stalled pid $pid SIGCONTed at mono_ns $t_cont, stopped $(((t_cont - t_stop) / 1000000)) ms (lease ${lease_s} s)"
else
    t_stop="" t_cont=""
    : >"$dir/stalled_in_transfer"
    echo "stall: none (no host had an op in its transfer while running)"
fi

status=0 exits=""
for i in 0 1 2; do
    rc=0
    wait "${host_pids[i]}" || rc=$?
    host_pids[i]=""
    exits+="${exits:+ }host$i=$rc"
    [ "$rc" = 0 ] || { echo "host$i exited $rc; its output: $dir/host$i.out" >&2; status=1; }
done

echo
echo "cluster demo summary ($files blocks of $size bytes, 3 hosts, 3 etcd members, one shared dir)"
check=0
python3 - "$dir" "$files" "$size" "$leader" "${stalled:-}" "${t_stop:-}" "${t_cont:-}" <<'PY' || check=$?
import os, re, struct, sys
from collections import defaultdict

d, files, size, leader, stalled, t_stop, t_cont = sys.argv[1:8]
files, size = int(files), int(size)
shared = os.path.join(d, "shared", "backup_set")

def fill(i, n):
    # The hosts' content of block i (taosx_host.c fill()): a xorshift32 stream.
    x, m, out = (2166136261 ^ i) & 0xFFFFFFFF, 0xFFFFFFFF, bytearray(n)
    for k in range(n):
        x ^= (x << 13) & m
        x ^= x >> 17
        x ^= (x << 5) & m
        out[k] = x & 0xFF
    return bytes(out)

def name(i):
    return "vg%02d_block_%05d.dat" % (i % 4, i)

# Each host's fence-log lines and its counters of both passes.
LINE = re.compile(r"^fence-log (accepted|refused|failed|lease-lost|transfer|write) (\S+) token=(\d+)(?: t=(\d+))?(?: t0=(\d+) t1=(\d+))?")
writes = []  # (host, outcome, key, token, t0, t1)
events = defaultdict(list)  # host -> every logged time
counts = {}
for h in range(3):
    c = defaultdict(int)
    section = None
    for line in open(os.path.join(d, "host%d.out" % h), errors="replace"):
        m = LINE.match(line)
        if m:
            outcome, key, token = m.group(1), m.group(2), int(m.group(3))
            if m.group(4):
                events[h].append(int(m.group(4)))
            if m.group(5):
                t0, t1 = int(m.group(5)), int(m.group(6))
                events[h] += [t0, t1]
                writes.append((h, outcome, key, token, t0, t1))
            continue
        if line.rstrip() in ("first pass", "second pass"):
            section = line.split()[0]
        for label in ("written by op", "refused by fence", "lease lost", "replayed"):
            if section and line.startswith("  " + label + " "):
                c[label] += int(line[len(label) + 2:].split()[0])
        metric = "backup_state_store_failovers_total"
        if line.split()[:1] == [metric]:
            c[metric] = max(c[metric], int(line.split()[1]))
    counts[h] = c

# The shared dir, read: each block present and intact; no temp file; each fence token the
# highest accepted one of its block.
entries = os.listdir(shared) if os.path.isdir(shared) else []
temps = [e for e in entries if e.endswith(".tmp")]
intact = missing = wrong = fence_bad = 0
accepted = defaultdict(list)
for (h, outcome, key, token, t0, t1) in writes:
    if outcome == "accepted":
        accepted[os.path.basename(key)].append((token, t0, t1, h))
for i in range(files):
    path = os.path.join(shared, name(i))
    try:
        data = open(path, "rb").read()
    except FileNotFoundError:
        missing += 1
        continue
    if data == fill(i, size):
        intact += 1
    else:
        wrong += 1
        print("  %s is not the block sent (%d bytes)" % (name(i), len(data)))
    try:
        rec = open(os.path.join(shared, "." + name(i) + ".fence"), "rb").read()
        token = struct.unpack("<Q", rec[4:12])[0] if len(rec) == 16 and rec[:4] == b"BCFN" else None
    except FileNotFoundError:
        token = None
    best = max((a[0] for a in accepted[name(i)]), default=None)
    if token is None or token != best:
        fence_bad += 1
        print("  %s: fence token %s, highest accepted write %s" % (name(i), token, best))

# The fence's order: per block, no write accepted after (t0 later than t1 of) an accepted
# write with a higher token; every refused write had a higher token accepted before it ended.
out_of_order = unjustified = 0
for key, acc in accepted.items():
    for (ta, a0, a1, ha) in acc:
        for (tb, b0, b1, hb) in acc:
            if ta < tb and a0 > b1:
                out_of_order += 1
                print("  %s: token %d (host%d) accepted after token %d (host%d)" % (key, ta, ha, tb, hb))
for (h, outcome, key, token, t0, t1) in writes:
    if outcome == "refused" and not any(tb > token and b0 < t1 for (tb, b0, b1, hb) in accepted[os.path.basename(key)]):
        unjustified += 1
        print("  %s: host%d's token %d refused with no higher token written" % (key, h, token))
multi = sum(1 for acc in accepted.values() if len(acc) > 1)

print("  %-6s %16s %21s %12s %10s %11s" % ("host", "blocks written", "late writes refused", "lease lost", "replayed", "failovers"))
for h in range(3):
    c = counts[h]
    print("  host%-2d %16d %21d %12d %10d %11d" % (h, c["written by op"], c["refused by fence"], c["lease lost"],
          c["replayed"], c["backup_state_store_failovers_total"]))
print("  (blocks written: writes the fence accepted; late writes refused: FENCED, the block a newer")
print("   claim's; lease lost: LEASE_LOST answers, a write accepted after its claim lapsed)")
print("  blocks present and intact       %d of %d in %s" % (intact, files, shared))
print("  blocks missing                  %d" % missing)
print("  blocks not intact               %d" % wrong)
print("  temp files left                 %d" % len(temps))
print("  fence tokens not the highest    %d (each block's .fence against its accepted writes)" % fence_bad)
print("  writes accepted out of order    %d (a lower token accepted after a higher one, by CLOCK_MONOTONIC)" % out_of_order)
print("  refusals without a newer write  %d" % unjustified)
print("  blocks written twice            %d (a late write accepted, then the newer claim's, in token order)" % multi)
print("  etcd failovers                  %d (leader m%s killed)" % (sum(counts[h]["backup_state_store_failovers_total"] for h in range(3)), leader))
if stalled:
    s, t_stop, t_cont = int(stalled), int(t_stop), int(t_cont)
    inside = [t for t in events[s] if t_stop < t < t_cont]
    after = [t for t in events[s] if t > t_cont]
    held = set(tuple(l.split()) for l in open(os.path.join(d, "stalled_in_transfer")) if l.strip())
    fate = defaultdict(int)
    for (h, outcome, key, token, t0, t1) in writes:
        if h == s and (key, "token=%d" % token) in held:
            fate[outcome] += 1
    late_refused = sum(1 for w in writes if w[0] == s and w[1] == "refused" and w[4] > t_cont)
    taken = set(key for (key, token) in held
                if any(tb > int(token[6:]) and hb != s for (tb, b0, b1, hb) in accepted[os.path.basename(key)]))
    print("  stalled host                    host%d, stopped %.2f s; %d of its events logged while stopped, %d after" % (
        s, (t_cont - t_stop) / 1e9, len(inside), len(after)))
    print("  its ops in transfer at the stop %d: %d late writes refused (FENCED), %d accepted (no newer write yet), %d other" % (
        len(held), fate["refused"], fate["accepted"], sum(fate.values()) - fate["refused"] - fate["accepted"]))
    print("  of them taken over              %d (another host's claim, a higher token, wrote the block)" % len(taken))
    if late_refused:
        print("  late writes refused             %d by the fence: host%d wrote after its lease, a newer claim had written" % (late_refused, s))
    else:
        print("  late writes refused             0: host%d's writes after its stall all came before any newer claim's" % s)
    if inside:
        print("  host%d logged while it should have been stopped" % s)
        sys.exit(1)
else:
    print("  stalled host                    none")
sys.exit(0 if missing == 0 and wrong == 0 and not temps and fence_bad == 0 and out_of_order == 0 and unjustified == 0 else 1)
PY
echo "  host exits                      $exits"
if [ "$check" != 0 ] || [ "$status" != 0 ]; then
    echo "FAIL: every block must be present and intact in the shared dir, the fence's order kept, every host exit 0; outputs in $dir"
    exit 1
fi
echo "PASS: each of the $files blocks present and intact in the shared dir; no write accepted out of token order; 3 hosts exited 0"
