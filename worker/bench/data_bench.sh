#!/usr/bin/env bash
# Data loading benchmark: time to first training step and peak resident memory for a large
# float32 activation file, as one trial (msae-worker train) and as a sweep of 20 trials on two
# local workers (msae-coordinator --local-workers 2).
#
#   worker/bench/data_bench.sh [BIN_DIR] [OLD_BIN_DIR]
#
# BIN_DIR holds msae-worker and msae-coordinator (default target/release). OLD_BIN_DIR, when
# given, holds binaries built from an earlier commit (the whole-file read) measured the same way
# (OLD_SWEEP=0 skips its sweep, which takes minutes).
# SIZE_GB (default 4) sets the file size; WORK (default /tmp/msae-data-bench) holds the file,
# which is deleted at the end. Needs python3 with numpy (to write the file) and /usr/bin/time.
set -euo pipefail

BIN=${1:-target/release}
OLD=${2:-}
SIZE_GB=${SIZE_GB:-4}
WORK=${WORK:-/tmp/msae-data-bench}
COLS=1024
ROWS=$((SIZE_GB * 1024 * 1024 * 1024 / (COLS * 4)))
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

echo "writing $WORK/acts.npy: $ROWS x $COLS float32 ($SIZE_GB GiB)" >&2
python3 - "$WORK/acts.npy" "$ROWS" "$COLS" <<'EOF'
import sys, numpy as np
path, rows, cols = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, cols))
rng = np.random.default_rng(0)
step = 65536
for a in range(0, rows, step):
    b = min(rows, a + step)
    out[a:b] = rng.standard_normal((b - a, cols), dtype=np.float32)
out.flush()
EOF

# A small SAE and few steps: the figures are about the data, not the model.
MODEL='num_stripes: 4
stripe_dim: 16
layer_k: 8
batch_size: 256
steps: 50
eval_every: 0
seed: 1'

trial_yaml() { # $1: extra data keys
  printf 'data: {path: acts.npy, validation_fraction: 0.01%s}\n%s\n' "$1" "$MODEL" >"$WORK/trial.yaml"
}

sweep_yaml() {
  {
    printf 'name: databench\nmethod: grid\nmetric: {name: fvu, goal: minimize}\nbase:\n'
    printf '  data: {path: acts.npy, validation_fraction: 0.01}\n'
    printf '%s\n' "$MODEL" | sed 's/^/  /'
    printf 'parameters:\n  lr:\n    values: ['
    seq -s, 1 20 | sed 's/\([0-9]*\)/0.000\1/g'
    printf ']\n'
  } >"$WORK/sweep.yaml"
}

# Seconds from the command's start to the first "training started" log line, and peak RSS.
measure() { # $1: label, then the command
  local label=$1
  shift
  sync
  local start
  start=$(date +%s.%N)
  /usr/bin/time -v "$@" >"$WORK/out.txt" 2>"$WORK/err.txt" &
  local tpid=$! child="" anon=0 file=0 a f
  # Peak RSS mixes the process's own (anonymous) memory with mapped file pages, which are the
  # shared, reclaimable page cache: sample the two apart.
  while kill -0 "$tpid" 2>/dev/null; do
    [ -z "$child" ] && child=$(pgrep -P "$tpid" | head -1 || true)
    if [ -n "$child" ] && [ -r "/proc/$child/status" ]; then
      a=$(awk '/^RssAnon/ {print $2}' "/proc/$child/status" 2>/dev/null || true)
      f=$(awk '/^RssFile/ {print $2}' "/proc/$child/status" 2>/dev/null || true)
      [ -n "$a" ] && [ "$a" -gt "$anon" ] && anon=$a
      [ -n "$f" ] && [ "$f" -gt "$file" ] && file=$f
    fi
    sleep 0.1
  done
  if ! wait "$tpid"; then
    echo "$label: FAILED (tail of the log below)" >&2
    tail -5 "$WORK/err.txt" >&2
  fi
  python3 - "$label" "$start" "$WORK/err.txt" "$anon" "$file" <<'EOF'
import re, sys, datetime
label, start, log = sys.argv[1], float(sys.argv[2]), open(sys.argv[3], errors="replace").read()
ts = re.search(r"^(\S+Z)\s.*training started", log, re.M)
first = "n/a"
if ts:
    t = datetime.datetime.fromisoformat(ts.group(1).replace("Z", "+00:00")).timestamp()
    first = f"{t - start:.2f} s"
rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", log)
rss = f"{int(rss.group(1)) / 1024 / 1024:.2f} GiB" if rss else "n/a"
anon, file = (f"{int(x) / 1024 / 1024:.2f} GiB" for x in sys.argv[4:6])
trials = len(re.findall(r"training started", log))
print(f"{label:<58} first step {first:>8}  peak RSS {rss:>9} (anon {anon:>9}, file {file:>9})"
      f"  wall {wall.group(1) if wall else 'n/a'}  trials {trials}")
EOF
}

run_all() { # $1: tag, $2: bin dir, $3: extra trial data keys
  local tag=$1 bin=$2
  trial_yaml "$3"
  (cd "$WORK" && measure "$tag: one trial" "$bin/msae-worker" train --config trial.yaml)
  sweep_yaml
  rm -rf "$WORK/db" "$WORK/runs"
  (cd "$WORK" && measure "$tag: 20-trial sweep, 2 local workers" \
    "$bin/msae-coordinator" sweep.yaml --local-workers 2 --db db --logdir none \
    --listen 127.0.0.1:0)
}

# One trial inside a memory cgroup (v1) capped below the file's size, when one can be made: the
# mapped file must train in less memory than it takes on disk.
capped_trial() { # $1: label, $2: bin dir, $3: limit in MiB
  local cg=/sys/fs/cgroup/memory/msae-data-bench-$$
  if ! mkdir "$cg" 2>/dev/null; then
    echo "$1: skipped (no writable memory cgroup)" >&2
    return 0
  fi
  echo $(($3 << 20)) >"$cg/memory.limit_in_bytes"
  # Pages already cached were charged elsewhere: drop this file's, so the capped run pays for
  # every page it reads.
  python3 -c 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$WORK/acts.npy"
  (cd "$WORK" && measure "$1" sh -c 'echo $$ >"$0/tasks" && exec "$@"' "$cg" \
    "$2/msae-worker" train --config trial.yaml)
  echo "  cgroup: peak charge $(($(cat "$cg/memory.max_usage_in_bytes") >> 20)) MiB of $3 MiB," \
    "limit reached $(cat "$cg/memory.failcnt") times"
  rmdir "$cg"
}

BIN=$(cd "$BIN" && pwd)
echo "== $SIZE_GB GiB float32, $ROWS x $COLS =="
run_all "mapped" "$BIN" ""
trial_yaml ""
capped_trial "mapped: one trial, memory cgroup capped at 1 GiB" "$BIN" 1024
trial_yaml ", mmap: false"
(cd "$WORK" && measure "copied (data.mmap: false): one trial" "$BIN/msae-worker" train --config trial.yaml)
if [ -n "$OLD" ]; then
  OLD=$(cd "$OLD" && pwd)
  if [ "${OLD_SWEEP:-1}" = 1 ]; then
    run_all "whole-file read (old binary)" "$OLD" ""
  else
    trial_yaml ""
    (cd "$WORK" && measure "whole-file read (old binary): one trial" "$OLD/msae-worker" train --config trial.yaml)
  fi
  trial_yaml ""
  capped_trial "whole-file read (old binary): one trial, capped at 1 GiB" "$OLD" 1024
fi
