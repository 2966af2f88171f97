#!/usr/bin/env bash
# Runs `fdiff train` as N processes on this machine (CPU), the way
# tests/test_multihost.py does: gloo collectives, coordinator on 127.0.0.1.
#
#   launch/local_multiprocess.sh N --config configs/test.py --workdir /tmp/w [--config.a.b=v ...]
#
# Environment: DEVICES_PER_PROCESS (default 2), PORT (default: a free one),
# LOG_DIR (default: a new temporary folder; process 0 also logs to the terminal),
# PYTHON (default: python3). SIGTERM/SIGINT go to every process, which then
# agree on a step, checkpoint and exit. Exits with the first failing status.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,10s/^# \{0,1\}//p' "$0" >&2
  exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python3}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$log_dir"

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}"

pids=()
for ((id = 0; id < num_processes; id++)); do
  "$python" -m fdiff_jax train "$@" --coordinator_address "127.0.0.1:$port" \
    --num_processes "$num_processes" --process_id "$id" > "$log_dir/process_$id.log" 2>&1 &
  pids+=("$!")
done
echo "started ${num_processes} processes on 127.0.0.1:$port; logs in $log_dir" >&2
trap 'kill -TERM "${pids[@]}" 2> /dev/null || true' TERM INT
tail -n +1 -f "$log_dir/process_0.log" --pid "${pids[0]}" >&2 &

status=0
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2> /dev/null; do  # A trapped signal ends `wait` early.
    wait "$pid" || true
  done
  code=0
  wait "$pid" || code=$?
  if [[ $status -eq 0 ]]; then status=$code; fi
done
exit "$status"
