#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a while: `fuzz/run.sh [seconds per target]`
# (default 20). Each target starts from its committed seeds (corpus/<target>) and from what
# earlier runs found (work/corpus/<target>, not committed). A crash stops the run: libFuzzer
# prints the input, cargo-fuzz saves it under artifacts/<target>/ (see docs/fuzzing.md).
#
# FUZZ_SANITIZER picks the sanitizer (default: address; `none` builds faster).
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-20}
sanitizer=${FUZZ_SANITIZER:-address}
# cargo-fuzz passes nightly-only flags (-Z, sanitizers); stable rustc takes them with this.
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null; then
  cargo install --locked cargo-fuzz@0.13.2
fi

start=$(date +%s)
cargo fuzz build -s "$sanitizer"
echo "fuzz targets built in $(($(date +%s) - start)) s"

# The store target writes, opens and syncs a store file per input: on tmpfs that is several
# times faster.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
  export TMPDIR=/dev/shm
fi
for target in $(cargo fuzz list); do
  mkdir -p "work/corpus/$target"
  echo "== fuzz $target for ${seconds}s"
  extra=()
  if [ "$target" = store_recovery ]; then
    # redb sizes a page read by the file's own (possibly damaged) page order and can try to
    # allocate gigabytes (docs/fuzzing.md, open issues): run in a child process that may run
    # out of memory without failing the run; crashes and hangs still fail it.
    extra=(-fork=1 -ignore_ooms=1 -ignore_timeouts=0 -ignore_crashes=0)
  fi
  # -timeout: an input that takes this long counts as a hang (the store must never hang).
  mkdir -p "artifacts/$target"
  before=$(ls "artifacts/$target")
  if ! cargo fuzz run -s "$sanitizer" "$target" "work/corpus/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 "${extra[@]}"; then
    # libFuzzer still exits non-zero after an ignored out-of-memory input: only a new crash
    # or hang fails the run.
    found=$(comm -13 <(echo "$before") <(ls "artifacts/$target") | grep -v '^oom-' || true)
    if [ "$target" != store_recovery ] || [ -n "$found" ]; then
      echo "fuzz target $target failed: $found" >&2
      exit 1
    fi
    echo "fuzz $target: out-of-memory inputs only (redb, docs/fuzzing.md); not a failure"
  fi
done
