#!/usr/bin/env bash
# Runs every fuzz target for <seconds> each, one after another (the machines have few
# cores), from the committed seeds plus a working corpus kept in fuzz/target/corpus/, and
# prints the executions and findings of each target. Exits non-zero when any target found
# something; its reproducer is in fuzz/artifacts/<target>/ (replay: cargo +nightly fuzz run
# <target> <file>). Needs the nightly toolchain and cargo-fuzz.
# Usage: fuzz/run_all.sh <seconds per target> [target...]
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)  # absolute paths: the ffi_exports target changes its working directory
seconds=${1:?usage: fuzz/run_all.sh <seconds per target> [target...]}
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(config_parse idempotency_journal log_records ffi_exports)

mkdir -p target
# Release code with debug assertions: an arithmetic overflow is a finding too.
cargo +nightly fuzz build -O --debug-assertions >target/fuzz-build.log 2>&1 || { cat target/fuzz-build.log; exit 2; }
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"
bin="$here/target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
total=0
failed=0
printf '%-22s %14s %10s %9s  %s\n' target executions exec/s findings artifacts
for t in "${targets[@]}"; do
    corpus="$here/target/corpus/$t"
    artifacts="$here/artifacts/$t"
    mkdir -p "$corpus" "$artifacts" "seeds/$t"
    log="target/fuzz-$t.log"
    before=$(find "$artifacts" -type f | wc -l)
    set +e
    dict=()
    [ -f "$here/dict/$t.dict" ] && dict=(-dict="$here/dict/$t.dict")
    # The binaries built above run directly: a source edit during a long run changes nothing.
    "$bin/$t" "$corpus" "$here/seeds/$t" "${dict[@]}" \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1
    rc=$?
    set -e
    after=$(find "$artifacts" -type f | wc -l)
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    execs=${execs:-0}
    findings=$((after - before))
    if [ "$rc" -ne 0 ] && [ "$findings" -eq 0 ]; then findings=1; fi
    total=$((total + execs))
    [ "$findings" -eq 0 ] || failed=1
    printf '%-22s %14s %10s %9s  %s\n' "$t" "$execs" "${rate:-?}" "$findings" \
        "$( [ "$findings" -eq 0 ] && echo - || echo "fuzz/artifacts/$t/ (log: fuzz/$log)")"
done
printf '%-22s %14s\n' total "$total"
exit "$failed"
