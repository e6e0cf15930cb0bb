# Shared by the start-* and stop-* scripts: where a local service keeps its files, how to wait
# until it is ready, and how to stop it by the PID its start script recorded. Source it.

# The directory for pid files, logs and data: $SWITCHYARD_HOME or .switchyard/ in the repository.
service_home() {
  local dir="${SWITCHYARD_HOME:-$(dirname "${BASH_SOURCE[0]}")/../../.switchyard}"
  mkdir -p "$dir"
  (cd "$dir" && pwd)
}

# Whether something accepts TCP connections on 127.0.0.1:$1.
tcp_answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_ready LABEL PID LOG SECONDS CHECK...: waits until the command CHECK succeeds; fails with
# the log's tail when the process exits or SECONDS pass.
wait_ready() {
  local label=$1 pid=$2 log=$3 seconds=$4
  shift 4
  local deadline=$((SECONDS + seconds))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if "$@"; then
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the $label exited; its log:" >&2
      tail -n 30 "$log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "the $label was not ready within ${seconds}s; log: $log" >&2
  return 1
}

# stop_by_pid_file LABEL NAME: stops the process whose PID $(service_home)/NAME.pid holds (TERM,
# then KILL after 10 s) and removes the file; nothing else is touched.
stop_by_pid_file() {
  local label=$1 pidfile
  pidfile="$(service_home)/$2.pid"
  if [ ! -f "$pidfile" ]; then
    echo "no $pidfile: no $label started by scripts/start-$2" >&2
    return 0
  fi
  local pid
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "stopped the $label (pid $pid)" >&2
  fi
  rm -f "$pidfile"
}
