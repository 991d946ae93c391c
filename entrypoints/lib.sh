# Shared by the job entrypoints (sourced, not run): the glue between a container and one `t2s` job.
#
# Environment contract (.env.example lists every variable):
#   T2S_CONFIG       path of a mounted run config (YAML), or
#   T2S_CONFIG_YAML  the YAML text itself; written to <run dir>/config.env.yaml
#   T2S_SET          extra overrides, space-separated key=value (each becomes `--set key=value`)
#   T2S_WORKDIR      working directory, the run volume (default /workspace); runs_dir is relative to it
#   T2S_KEEP_POD=1   keep the RunPod pod alive after the job (debugging)
#   T2S_OWNER        uid:gid that the run dir is handed to at exit (a root container writing a user's folder)
#   T2S_MAX_RUNTIME_MIN, T2S_MAX_COST_USD with T2S_COST_PER_HOUR_USD
#                    the pod's own caps: past either, the job is stopped (see t2s_start_caps)
#   RUNPOD_POD_ID    set by RunPod inside a pod: the job then ends by terminating its own pod
#   T2S_TERM_UPLOAD_S  a job still stopping this many seconds (3) after a SIGTERM from outside gets its logs
#                    so far uploaded at once (see t2s_upload_early)
#
# Everything the job prints is also appended to <run dir>/logs/entrypoint-<job>.log. SIGTERM or
# SIGINT (spot preemption, docker stop) is forwarded to the job as SIGTERM and the job's own exit
# code is returned. Whatever happens, the run's logs are uploaded and, on RunPod, the pod is
# terminated; a failed job's one-line error is the last line printed. `t2s train` on a run whose
# prep has not run runs prep first. Never `set -x` here and never print the environment: it holds HF_TOKEN.

set -euo pipefail

_t2s_job=""
_t2s_run_dir=""
_t2s_log=""
_t2s_child_pid=""
_t2s_tee_pids=()
_t2s_log_start=0

t2s_say() { printf '== entrypoint %s: %s\n' "$_t2s_job" "$*"; }

t2s_error() {
  printf 'entrypoint %s: error: %s\n' "$_t2s_job" "$*" >&2
  exit 2
}

# Prints <runs_dir>/<run_id> of the resolved config (defaults + file + overrides). When the config
# does not validate, falls back to the raw YAML or the defaults so that the job's own one-line
# error still lands in a log.
t2s_run_dir() {
  python3 - "$@" <<'PY'
import re, sys
try:
    from jobs.lib.config import load_config
    print(load_config(sys.argv[1], sys.argv[2:]).run_dir)
except Exception:
    import yaml
    try:
        raw = yaml.safe_load(open(sys.argv[1]))
    except Exception:
        raw = None
    raw = raw if isinstance(raw, dict) else {}
    run_id = str(raw.get("run_id") or "default")
    run_id = run_id if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run_id) else "default"
    print(f"{raw.get('runs_dir') or 'runs'}/{run_id}")
PY
}

# From here on, stdout and stderr each still go to the terminal and both are appended to the log.
# The tees ignore SIGINT/SIGTERM so that a Ctrl-C or `docker stop` cannot cut the log off while the
# job is still writing its last lines.
t2s_start_log() {
  local fifo_dir
  fifo_dir="$(mktemp -d "${TMPDIR:-/tmp}/t2s-entrypoint.XXXXXX")"
  mkfifo -m 600 "$fifo_dir/out" "$fifo_dir/err"
  (trap '' INT TERM; exec tee -a "$_t2s_log") <"$fifo_dir/out" &
  _t2s_tee_pids=("$!")
  (trap '' INT TERM; exec tee -a "$_t2s_log" >&2) <"$fifo_dir/err" &
  _t2s_tee_pids+=("$!")
  exec 3>&1 4>&2 >"$fifo_dir/out" 2>"$fifo_dir/err"
  rm -rf "$fifo_dir"  # every end is open now; the names are no longer needed
}

# Back to the plain terminal, once the tees have written everything to the log. A process the job
# left behind may still hold the pipes open: after 5 s the tees are stopped anyway, so that the pod
# still terminates.
t2s_stop_log() {
  [ "${#_t2s_tee_pids[@]}" -gt 0 ] || return 0
  exec 1>&3 2>&4 3>&- 4>&-
  local pid tries alive
  for ((tries = 0; tries < 50; tries++)); do
    alive=""
    for pid in "${_t2s_tee_pids[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ -n "$alive" ] || break
    sleep 0.1
  done
  for pid in "${_t2s_tee_pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  _t2s_tee_pids=()
}

# A subshell forked in a handler (the early upload) can take a signal before it resets these traps: only the
# entrypoint's own shell ($$) forwards signals and cleans up, or a pod's clean-up ran twice.
t2s_forward_signal() {
  [ "$BASHPID" = "$$" ] || exit 0
  if [ -n "$_t2s_child_pid" ] && kill -0 "$_t2s_child_pid" 2>/dev/null; then
    t2s_say "stop requested: sending SIGTERM to the job (pid $_t2s_child_pid) and waiting for it"
    kill -TERM "$_t2s_child_pid" 2>/dev/null || true
    t2s_upload_early
  else
    exit 143  # nothing running yet: stop here (the EXIT trap still uploads and terminates)
  fi
}

# A stop from outside (docker stop; RunPod ending the pod, or `t2s-infra down`) may be followed by a kill before
# the job has finished checkpointing, and the exit's upload would never run: if the job still runs
# T2S_TERM_UPLOAD_S (3) seconds after the SIGTERM, the logs so far are uploaded at once; the exit uploads them
# again, complete, if there is time. (Not for the caps' own SIGTERM: their clean-up has its grace.)
_t2s_early_pid=""
t2s_upload_early() {
  [ -n "$_t2s_run_dir" ] && [ -z "$_t2s_early_pid" ] && [ -z "$(t2s_cap_reason)" ] || return 0
  local child="$_t2s_child_pid" wait_s="${T2S_TERM_UPLOAD_S:-3}" where=()
  [ -n "${RUNPOD_POD_ID:-}" ] || where=(--if-configured)
  (
    running=""
    trap '[ -z "$running" ] || kill "$running" 2>/dev/null; exit 0' TERM
    trap - INT EXIT
    sleep "$wait_s" & running=$!
    wait "$running"
    kill -0 "$child" 2>/dev/null || exit 0
    t2s_cap_say "the job is still stopping ${wait_s}s after SIGTERM: uploading its logs so far, in case the pod is killed first"
    t2s-infra upload-logs "$_t2s_run_dir" "${where[@]}" 2>&1 & running=$!
    wait "$running" || t2s_cap_say "warning: the early log upload failed"
  ) 1>&3 2>&4 3>&- 4>&- &
  _t2s_early_pid=$!
}

t2s_stop_upload_early() {
  [ -n "$_t2s_early_pid" ] || return 0
  kill -TERM "$_t2s_early_pid" 2>/dev/null || true
  wait "$_t2s_early_pid" 2>/dev/null || true
  _t2s_early_pid=""
}

# --- the pod's own caps (infra/caps.py computes when and why) ---------------------------------------------
_t2s_cap_pid=""
_t2s_cap_file=""

# A line to the container's output and to the log, from the cap timer (which holds neither pipe of the
# tees, so that they can finish while it still waits).
t2s_cap_say() {
  local line
  line="$(t2s_say "$@")"
  printf '%s\n' "$line"
  [ -z "$_t2s_log" ] || printf '%s\n' "$line" >>"$_t2s_log"
}

# Arms a timer for the running job: at the cap, SIGTERM to this entrypoint (forwarded to the job, which
# checkpoints and stops); T2S_CAP_GRACE_S (120) later, SIGKILL to the job if it still runs; as long again
# later, the pod's own terminate, in case the clean-up hangs. The reason ends up in the last log line.
t2s_start_caps() {
  local cap seconds reason grace="${T2S_CAP_GRACE_S:-120}"
  if ! cap="$(python3 -m infra.caps 2>&1)"; then
    t2s_say "warning: the pod's caps are not armed: $cap"
    return 0
  fi
  [ -n "$cap" ] || return 0
  seconds="${cap%%$'\t'*}"
  reason="${cap#*$'\t'}"
  _t2s_cap_file="$(mktemp "${TMPDIR:-/tmp}/t2s-cap.XXXXXX")"
  t2s_say "the job is stopped after ${seconds}s if still running: ${reason#stopped by }"
  local entrypoint=$$
  (
    sleeper=""
    trap '[ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null; exit 0' TERM
    trap - INT EXIT
    nap() { sleep "$1" & sleeper=$!; wait "$sleeper"; sleeper=""; }
    nap "$seconds"
    printf '%s\n' "$reason" >"$_t2s_cap_file"
    t2s_cap_say "$reason: stopping the job (SIGTERM)"
    kill -TERM "$entrypoint" 2>/dev/null || true
    nap "$grace"
    kill -KILL "$(cat "$_t2s_cap_file.job" 2>/dev/null)" 2>/dev/null && t2s_cap_say "$reason: the job was still running ${grace}s later: killed it"
    nap "$grace"
    t2s_cap_say "$reason: the clean-up did not finish within ${grace}s: terminating the pod now"
    t2s-infra self-terminate --exit-code 137 --reason "$reason"
  ) 1>&3 2>&4 3>&- 4>&- &
  _t2s_cap_pid=$!
}

# The reason the timer stopped the job, if it did.
t2s_cap_reason() {
  [ ! -s "${_t2s_cap_file:-}" ] || head -n 1 "$_t2s_cap_file"
}

# Disarms the timer and forgets its reason.
t2s_stop_caps() {
  if [ -n "$_t2s_cap_pid" ]; then
    kill -TERM "$_t2s_cap_pid" 2>/dev/null || true
    wait "$_t2s_cap_pid" 2>/dev/null || true
    _t2s_cap_pid=""
  fi
  [ -z "$_t2s_cap_file" ] || rm -f "$_t2s_cap_file" "$_t2s_cap_file.job"
  _t2s_cap_file=""
}

# Runs a t2s-infra step with its output shown and appended to the log; never fails the entrypoint.
t2s_infra() {
  if ! command -v t2s-infra >/dev/null 2>&1; then
    printf '== entrypoint %s: t2s-infra not found; skipped %s\n' "$_t2s_job" "$1" >&2
    return 0
  fi
  if [ -n "$_t2s_log" ] && [ -d "$(dirname "$_t2s_log")" ]; then
    t2s-infra "$@" 2>&1 | tee -a "$_t2s_log" || t2s_say "warning: t2s-infra $1 failed" | tee -a "$_t2s_log"
  else
    t2s-infra "$@" 2>&1 || t2s_say "warning: t2s-infra $1 failed"
  fi
}

# `docker run --user $(id -u):$(id -g)` leaves files the user owns, but that uid has no writable HOME
# (matplotlib, Triton and torch keep caches there); T2S_OWNER asks a root container to hand the run dir over.
t2s_check_owner() {
  if [ ! -w "${HOME:-/}" ]; then
    HOME="${TMPDIR:-/tmp}/t2s-home-$(id -u)"
    export HOME
    mkdir -p "$HOME"
  fi
  [ -n "${T2S_OWNER:-}" ] || return 0
  [[ "$T2S_OWNER" =~ ^[0-9]+:[0-9]+$ ]] || t2s_error "T2S_OWNER=$T2S_OWNER is not uid:gid: use -e T2S_OWNER=\$(id -u):\$(id -g)"
  if [ "$(id -u)" != 0 ] && [ "$T2S_OWNER" != "$(id -u):$(id -g)" ]; then
    t2s_error "T2S_OWNER=$T2S_OWNER needs a root container (this one runs as $(id -u):$(id -g)): drop T2S_OWNER or --user"
  fi
}

t2s_give_to_owner() {
  [ -n "${T2S_OWNER:-}" ] && [ -n "$_t2s_run_dir" ] && [ -d "$_t2s_run_dir" ] || return 0
  chown -R "$T2S_OWNER" "$_t2s_run_dir" || t2s_say "warning: could not hand $_t2s_run_dir to $T2S_OWNER"
}

# The job's own one-line error (`t2s <job>: error: ...`), said again after the clean-up's output, so that it is
# the container's last log line; a job that died without one gets a line that says where its log is.
t2s_repeat_error() {
  local rc="$1" line=""
  [ "$rc" -ne 0 ] && [ -n "$_t2s_log" ] || return 0
  if [ -f "$_t2s_log" ]; then
    # (not anchored: a progress bar's unterminated line may precede it in the log)
    line="$(tail -c +"$((_t2s_log_start + 1))" "$_t2s_log" | grep -oE 't2s [a-z]+: error: .*' | tail -n 1)" || true
  fi
  printf '%s\n' "${line:-entrypoint $_t2s_job: error: t2s $_t2s_job failed with exit code $rc; its log: $_t2s_log}" >&2
}

t2s_on_exit() {
  local rc=$?
  [ "$BASHPID" = "$$" ] || exit "$rc"  # (see t2s_forward_signal)
  trap - EXIT
  trap '' INT TERM  # the clean-up below must run to the end
  t2s_stop_upload_early  # (an early upload still under way is stopped: the one below sends everything)
  t2s_stop_log
  local reason ending=(--exit-code "$rc")
  reason="$(t2s_cap_reason)"
  [ -z "$reason" ] || ending+=(--reason "$reason")
  if [ -n "$_t2s_run_dir" ]; then
    # A pod always has a logs repo (the launcher sets one); a local `docker run` may keep its logs on the volume.
    [ -n "${RUNPOD_POD_ID:-}" ] || ending+=(--if-configured)
    t2s_infra upload-logs "$_t2s_run_dir" "${ending[@]}"
  fi
  t2s_stop_caps
  t2s_give_to_owner
  # The job's own error last (`docker logs` ends with it); on a pod, only the line of how the pod ends follows.
  t2s_repeat_error "$rc"
  if [ -n "${RUNPOD_POD_ID:-}" ] && [ "${T2S_KEEP_POD:-}" != "1" ]; then
    t2s_infra self-terminate "${ending[@]}"
  fi
  exit "$rc"
}

# t2s_run ARGS...: runs `t2s ARGS...` in the background (so that a SIGTERM can be passed on) and returns its
# exit code. `wait` returns 128+signal as soon as a trapped signal arrives: wait again until the job has
# ended, then once more for its own exit code (bash keeps it), in case the job ended during the trap.
t2s_run() {
  local rc again
  t2s "$@" 3>&- 4>&- &
  _t2s_child_pid=$!
  [ -z "$_t2s_cap_file" ] || printf '%s\n' "$_t2s_child_pid" >"$_t2s_cap_file.job"  # what the cap timer kills
  while :; do
    rc=0
    wait "$_t2s_child_pid" || rc=$?
    kill -0 "$_t2s_child_pid" 2>/dev/null || break
  done
  again=0
  wait "$_t2s_child_pid" 2>/dev/null || again=$?
  [ "$again" -eq 127 ] || rc=$again
  _t2s_child_pid=""
  return "$rc"
}

# t2s_entrypoint JOB [extra t2s args...]: runs `t2s JOB --config ... --set ...` under the contract above.
t2s_entrypoint() {
  _t2s_job="$1"
  shift
  trap t2s_on_exit EXIT
  trap t2s_forward_signal TERM INT
  t2s_check_owner

  local workdir="${T2S_WORKDIR:-/workspace}"
  if ! mkdir -p "$workdir" || ! cd "$workdir"; then
    t2s_error "cannot enter T2S_WORKDIR=$workdir: mount the run volume there or set T2S_WORKDIR"
  fi

  local config from_env=""
  if [ -n "${T2S_CONFIG:-}" ]; then
    config="$T2S_CONFIG"
    [ -f "$config" ] || t2s_error "T2S_CONFIG=$config is not a file in the container: mount it (-v \$PWD/configs:/workspace/configs) or pass the YAML in T2S_CONFIG_YAML"
  elif [ -n "${T2S_CONFIG_YAML:-}" ]; then
    config="$(mktemp "${TMPDIR:-/tmp}/t2s-config.XXXXXX")"
    printf '%s' "$T2S_CONFIG_YAML" >"$config"
    from_env=1
  else
    t2s_error "no run config: set T2S_CONFIG=/path/to/config.yaml (a mounted file) or T2S_CONFIG_YAML (the YAML text)"
  fi

  local sets=() overrides=() item arg_sets=() args=("$@") i
  read -r -a sets <<<"${T2S_SET:-}"
  for item in "${sets[@]}"; do
    overrides+=(--set "$item")
  done
  # --set pairs among the job's own arguments (`docker run t2s:train --set run_id=x`) name the run dir too.
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
      --set | -s) [ $((i + 1)) -lt ${#args[@]} ] && arg_sets+=("${args[i + 1]}") ;;
      --set=*) arg_sets+=("${args[i]#--set=}") ;;
    esac
  done

  _t2s_run_dir="$(t2s_run_dir "$config" "${sets[@]}" "${arg_sets[@]}")" || t2s_error "cannot read the run id from $config (is the t2s package installed?)"
  mkdir -p "$_t2s_run_dir/logs"
  if [ -n "$from_env" ]; then
    mv -f "$config" "$_t2s_run_dir/config.env.yaml"
    config="$_t2s_run_dir/config.env.yaml"
  fi
  _t2s_log="$_t2s_run_dir/logs/entrypoint-$_t2s_job.log"
  _t2s_log_start="$(stat -c %s "$_t2s_log" 2>/dev/null || echo 0)"
  t2s_start_log

  local started=$SECONDS rc=0 prep_sets=()
  t2s_say "$(date -u +%Y-%m-%dT%H:%M:%SZ) run dir $_t2s_run_dir, config $config${sets[*]:+, overrides: ${sets[*]}}"
  t2s_start_caps
  # A fresh volume: what `docker run t2s:train` means is prep, then train (rundir.py's <job>.done marker).
  if [ "$_t2s_job" = train ] && [ ! -f "$_t2s_run_dir/prep.done" ]; then
    t2s_say "prep has not run in $_t2s_run_dir: running t2s prep first"
    for item in "${arg_sets[@]}"; do
      prep_sets+=(--set "$item")
    done
    t2s_run prep --config "$config" "${overrides[@]}" "${prep_sets[@]}" || rc=$?
    if [ "$rc" -ne 0 ]; then
      t2s_say "t2s prep exited with code $rc after $((SECONDS - started))s; train did not start"
      exit "$rc"
    fi
  fi
  t2s_run "$_t2s_job" --config "$config" "${overrides[@]}" "$@" || rc=$?
  t2s_say "t2s $_t2s_job exited with code $rc after $((SECONDS - started))s"
  exit "$rc"
}
