#!/usr/bin/env bash
# `make image-smoke`: each flavor's image (cu12, then cu118) built and run for real on a CPU machine without
# Docker Hub or GitHub.
#
#   engine   DOCKER_HOST's, else /var/run/docker.sock's, else a private dockerd (as root: Debian's docker.io,
#            installed if missing) with its own roots, no network set-up, stopped at exit
#   bases    made once, kept in the engine: local/debian:bookworm (debootstrap), then per flavor a CPU stand-in
#            for its pytorch/pytorch base: local/torch-cpu:2.13.0 (cu12, images/cpu-base.Dockerfile) and
#            local/torch-cpu-cu118:2.1.2 (cu118: the machine's Python 3.10, images/cpu-base-cu118.Dockerfile)
#   build    `make images FLAVOR=<flavor> FLASH_ATTN_WHEEL=` on that base, from a copy of the tree holding decoy secrets
#   jobs     `docker run t2s:<job>` on the tiny model with runs volumes: train on a fresh volume (prep first),
#            SIGTERM and resume, merge, eval, push (dry run), prep + pipeline, a failing job; then no secret in
#            the images or the run's files, and the files are the invoking user's to read and delete
#   launch   tests/test_launch_e2e.py against the image, when that file exists (cu118: the card's config's test)
# The build, the jobs and the launch run once per flavor (smoke_flavor): a new flavor is a line in each flavor_*.
#
# Environment: DOCKER_HOST (an engine to use); T2S_SMOKE_CACHE (the private engine's data root and lock,
# default ~/.cache/t2s-image-smoke); T2S_SMOKE_FLAVORS (default "cu12 cu118"); T2S_SMOKE_BASE (a Python 3.11 +
# torch image in the engine to build cu12 on, instead of local/torch-cpu:2.13.0), T2S_SMOKE_BASE_CU118 (the same
# with Python 3.10, for cu118, instead of local/torch-cpu-cu118:2.1.2); T2S_SMOKE_OWNER (uid:gid the volumes belong to when run as root,
# default 4242:4242); T2S_SMOKE_KEEP=1 keeps the work dir. Bad input is one line and a non-zero exit.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${T2S_SMOKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/t2s-image-smoke}"
DEBIAN_BASE=local/debian:bookworm
read -r -a FLAVORS <<<"${T2S_SMOKE_FLAVORS:-cu12 cu118}"
JOBS=(prep train rl merge export eval push pipeline serve)
STEPS=200  # training steps: long enough (~15 s) for a SIGTERM to land mid-run
# Disk the engine needs, measured (images/README.md): the cu12 base's build peaks at ~3 GB, cu118's (torch 2.1.2
# with PyPI's CUDA libraries) at ~7 GB; a t2s build adds ~2 GB.
NEED_GB=3

# --- flavors: what differs between them (add a flavor here) ---------------------------------------------

flavor_python() { case "$1" in cu12) echo 3.11 ;; cu118) echo 3.10 ;; esac; }
flavor_torch() { case "$1" in cu12) echo 2.13.0 ;; cu118) echo 2.1.2 ;; esac; }
flavor_dockerfile() { echo "$REPO/images/cpu-base$([ "$1" = cu12 ] || echo "-$1").Dockerfile"; }
# Tagged with its Dockerfile's hash, so that a changed stand-in is made again rather than reused.
flavor_default_base() {
  echo "local/torch-cpu$([ "$1" = cu12 ] || echo "-$1"):$(flavor_torch "$1")-$(sha256sum <"$(flavor_dockerfile "$1")" | cut -c1-8)"
}
flavor_base() {  # the stand-in base the flavor builds on: the default, or the one T2S_SMOKE_BASE[_CU118] names
  case "$1" in
    cu12) echo "${T2S_SMOKE_BASE:-$(flavor_default_base cu12)}" ;;
    cu118) echo "${T2S_SMOKE_BASE_CU118:-$(flavor_default_base cu118)}" ;;
  esac
}
flavor_base_setting() { case "$1" in cu12) echo T2S_SMOKE_BASE ;; cu118) echo T2S_SMOKE_BASE_CU118 ;; esac; }
flavor_need_gb_with_base() { case "$1" in cu12) echo 7 ;; cu118) echo 11 ;; esac; }

WORK=""
DOCKERD_PID=""
CONTAINERS=()
TIMES=()
FAILED=1
ERROR=""

say() { printf '== image-smoke: %s\n' "$*"; }
# One line saying what is wrong and how to fix it; printed last, after the clean-up's own lines.
die() {
  ERROR="$*"
  exit 1
}

stage_started=0
stage() {
  stage_started=$SECONDS
  say "$*"
}
FLAVOR_LABEL=""  # "<flavor>: " while a flavor's stages run
stage_done() {
  local took=$((SECONDS - stage_started))
  TIMES+=("$(printf '%4ss  %s%s' "$took" "$FLAVOR_LABEL" "$1")")
  say "$FLAVOR_LABEL$1: ok (${took}s)"
}

# --- engine ---------------------------------------------------------------------------------------------

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"; } >>"$WORK/logs/apt.log" 2>&1
}

engine_answers() { docker info --format '{{.ServerVersion}}' >/dev/null 2>&1; }

# A running engine, or one line saying why there is none.
use_engine() {
  local out
  if [ -n "${DOCKER_HOST:-}" ] || [ -S /var/run/docker.sock ]; then
    local where="${DOCKER_HOST:-unix:///var/run/docker.sock}"
    if ! command -v docker >/dev/null; then
      die "no docker command to talk to $where: install Docker's CLI (apt-get install docker.io)"
    fi
    if out="$(docker info --format '{{.ServerVersion}}' 2>&1)"; then
      say "engine at $where (Docker $out)"
      return 0
    fi
    case "$out" in
      *"permission denied"*)
        die "no permission to use the engine at $where: add yourself to the docker group (sudo usermod -aG docker \$USER, then log in again) or run as root" ;;
    esac
    if [ -n "${DOCKER_HOST:-}" ]; then
      die "DOCKER_HOST=$DOCKER_HOST does not answer ($(printf '%s' "$out" | tail -n 1)): start that engine, or unset DOCKER_HOST and run as root so that a private one is started"
    fi
  fi
  start_private_engine
}

start_private_engine() {
  if [ "$(id -u)" != 0 ]; then
    die "no Docker engine answers (DOCKER_HOST is unset, none at /var/run/docker.sock) and starting a private one needs root: start Docker, point DOCKER_HOST at one, or run as root"
  fi
  if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    say "installing Debian's docker.io (apt-get)"
    apt_install docker.io || die "no Docker engine here and apt-get cannot install docker.io (log: $WORK/logs/apt.log): install Docker, or point DOCKER_HOST at a running engine"
  fi
  mkdir -p "$CACHE/data" "$WORK/exec"
  # Own roots and socket; no iptables, bridge or forwarding: the machine's network set-up is never touched.
  # The pidfile lives with the data root, so that a second engine on the same data root refuses to start.
  dockerd --data-root "$CACHE/data" --exec-root "$WORK/exec" --pidfile "$CACHE/dockerd.pid" \
    -H "unix://$WORK/docker.sock" --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
    --bridge=none --storage-driver overlay2 >"$WORK/logs/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  export DOCKER_HOST="unix://$WORK/docker.sock"
  local tries
  for ((tries = 0; tries < 60; tries++)); do
    if engine_answers; then
      say "private engine (Docker $(docker info --format '{{.ServerVersion}}'), data root $CACHE/data)"
      return 0
    fi
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
      DOCKERD_PID=""
      die "the private engine did not start: $(grep -m1 -iE 'level=(fatal|error)|failed' "$WORK/logs/dockerd.log" | cut -c1-200) (log: $WORK/logs/dockerd.log)"
    fi
    sleep 1
  done
  die "the private engine did not answer within 60 s (log: $WORK/logs/dockerd.log)"
}

stop_private_engine() {
  [ -n "$DOCKERD_PID" ] || return 0
  local containerd_pid tries
  containerd_pid="$(cat "$WORK/exec/containerd/containerd.pid" 2>/dev/null || true)"
  kill "$DOCKERD_PID" 2>/dev/null || true
  for ((tries = 0; tries < 30; tries++)); do
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 1
  done
  kill -KILL "$DOCKERD_PID" 2>/dev/null || true
  wait "$DOCKERD_PID" 2>/dev/null || true
  # dockerd stops the containerd it started; after a SIGKILL that one would be left behind.
  if [ -n "$containerd_pid" ] && kill -0 "$containerd_pid" 2>/dev/null; then
    kill "$containerd_pid" 2>/dev/null || true
  fi
  umount "$WORK/exec/netns/default" 2>/dev/null || true
  DOCKERD_PID=""
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ "${#CONTAINERS[@]}" -gt 0 ] && engine_answers; then
    docker rm -f "${CONTAINERS[@]}" >/dev/null 2>&1
  fi
  if [ -n "$DOCKERD_PID" ]; then
    docker image prune -f >/dev/null 2>&1  # older builds' layers: the cache keeps the bases and the last build
    stop_private_engine
  fi
  if [ -n "$WORK" ]; then
    if [ "${T2S_SMOKE_KEEP:-}" = 1 ] || { [ "$FAILED" = 1 ] && [ -n "$(ls -A "$WORK/logs" 2>/dev/null)" ]; }; then
      rm -rf "$WORK/ctx" "$WORK/ctx-base" "$WORK/rootfs" "$WORK/exec"
      say "work dir kept for its logs: $WORK"
    else
      rm -rf "$WORK"
    fi
  fi
  [ -z "$ERROR" ] || printf 'image-smoke: error: %s\n' "$ERROR" >&2
  exit "$rc"
}

# --- disk -----------------------------------------------------------------------------------------------

# check_disk DIR GB WHAT HINT: one line when the filesystem holding DIR has less than GB free.
check_disk() {
  local dir="$1" need_gb="$2" what="$3" hint="$4" free_kb
  while [ ! -d "$dir" ]; do dir="$(dirname "$dir")"; done
  free_kb="$(df -Pk "$dir" | awk 'NR == 2 { print $4 }')"
  if [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
    die "not enough disk for $what: $((free_kb / 1024)) MB free at $dir, $need_gb GB needed: free some space, or $hint"
  fi
}

check_engine_disk() {
  local need_gb="$1" root
  if [ -n "$DOCKERD_PID" ]; then
    root="$CACHE/data"
  else
    root="$(docker info --format '{{.DockerRootDir}}' 2>/dev/null || true)"
  fi
  if [ -n "$root" ] && [ -e "$root" ]; then
    check_disk "$root" "$need_gb" "the engine's images (its data root)" \
      "$([ -n "$DOCKERD_PID" ] && echo "set T2S_SMOKE_CACHE to a bigger disk" || echo "prune that engine's images")"
  else
    say "the engine's data root ${root:-?} is not on this machine: its free disk is not checked"
  fi
}

# --- bases ----------------------------------------------------------------------------------------------

has_image() { docker image inspect "$1" >/dev/null 2>&1; }

make_debian_base() {
  [ "$(id -u)" = 0 ] || die "making $DEBIAN_BASE needs root (debootstrap): run once as root, or set T2S_SMOKE_BASE to a Python 3.11 + torch image in the engine"
  command -v debootstrap >/dev/null || apt_install debootstrap \
    || die "apt-get cannot install debootstrap (log: $WORK/logs/apt.log): install it, or set T2S_SMOKE_BASE"
  local mirror
  mirror="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)"
  mirror="${mirror:-$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)}"
  [ -n "$mirror" ] || die "no Debian mirror in /etc/apt/sources.list(.d): debootstrap needs one"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$mirror" >"$WORK/logs/debootstrap.log" 2>&1 \
    || die "debootstrap of bookworm from $mirror failed (log: $WORK/logs/debootstrap.log)"
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
    "$mirror" "$mirror" "$mirror" >"$WORK/rootfs/etc/apt/sources.list"
  tar --numeric-owner -C "$WORK/rootfs" -c . | docker import - "$DEBIAN_BASE" >/dev/null \
    || die "docker import of the Debian root file system failed"
  rm -rf "$WORK/rootfs"
}

# make_torch_base_<flavor> BASE: the flavor's CPU stand-in, tagged BASE.
make_torch_base_cu12() {
  local base="$1" ctx="$WORK/ctx-base" python="$REPO/.venv/bin/python" torch_version
  torch_version="$(flavor_torch cu12)"
  [ -x "$python" ] || python=python3
  rm -rf "$ctx" && mkdir -p "$ctx/certs"
  cp /usr/local/share/ca-certificates/*.crt "$ctx/certs/" 2>/dev/null || true
  # The host's pip finds the CPU build (2.13.0+cpu) where it has one (CI keeps it on disk); else PyPI's.
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d "$ctx" "torch==$torch_version" \
    >"$WORK/logs/torch-download.log" 2>&1 \
    || die "pip cannot download torch==$torch_version for Python 3.11 (log: $WORK/logs/torch-download.log)"
  cp "$REPO/images/cpu-base.Dockerfile" "$ctx/Dockerfile"
  DOCKER_BUILDKIT=0 docker build --network host --build-arg "DEBIAN_BASE=$DEBIAN_BASE" -t "$base" "$ctx" 2>&1 \
    | timestamped >"$WORK/logs/build-base-cu12.log" || build_failed "the CPU base $base" "$WORK/logs/build-base-cu12.log"
  docker image prune -f --filter label=t2s.smoke.stage=wheel >/dev/null  # the wheel's stage, no longer needed
  rm -rf "$ctx"
}

# The machine's Python 3.10 (bookworm has none): python3.10 on PATH, else pyenv's; its installation prefix.
python310_prefix() {
  local candidate
  for candidate in "${PYTHON_CU118:-}" python3.10 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10; do
    if [ -z "$candidate" ] || ! command -v "$candidate" >/dev/null 2>&1; then continue; fi
    # (a pyenv shim answers to python3.10 without one selected: the next candidate then)
    "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10) and sys.prefix == sys.base_prefix; print(sys.prefix)' \
      2>/dev/null && return 0
  done
  return 1
}

make_torch_base_cu118() {
  local base="$1" ctx="$WORK/ctx-base" prefix
  prefix="$(python310_prefix)" \
    || die "the cu118 stand-in base needs a Python 3.10 on this machine (not a venv's) to copy in: pyenv install 3.10, or set PYTHON_CU118 to one, or T2S_SMOKE_BASE_CU118 to an image with Python 3.10 and torch 2.1.2"
  rm -rf "$ctx" && mkdir -p "$ctx/certs"
  cp /usr/local/share/ca-certificates/*.crt "$ctx/certs/" 2>/dev/null || true
  cp -a "$prefix" "$ctx/python"
  find "$ctx/python" -name __pycache__ -prune -exec rm -rf {} +
  cp "$REPO/images/cpu-base-cu118.Dockerfile" "$ctx/Dockerfile"
  DOCKER_BUILDKIT=0 docker build --network host --build-arg "DEBIAN_BASE=$DEBIAN_BASE" --build-arg "PYTHON_PREFIX=$prefix" \
    -t "$base" "$ctx" 2>&1 | timestamped >"$WORK/logs/build-base-cu118.log" \
    || build_failed "the CPU base $base" "$WORK/logs/build-base-cu118.log"
  rm -rf "$ctx"
}

# Each line with the time it was written: the build log then says what each step cost.
timestamped() {
  local line
  while IFS= read -r line; do printf '%(%T)T %s\n' -1 "$line"; done
}

build_failed() {
  tail -n 25 "$2" >&2
  if grep -q "no space left on device" "$2"; then
    die "building $1 ran out of disk (no space left on device): free space where the engine keeps its images"
  fi
  die "building $1 failed (the end of its log is above; all of it: $2)"
}

# The base must be what the Dockerfile expects of the flavor's pytorch/pytorch: its Python with torch, on PATH.
check_base() {  # check_base FLAVOR BASE
  local flavor="$1" base="$2" python out
  python="$(flavor_python "$flavor")"
  out="$(docker run --rm --network none --entrypoint python "$base" -W ignore -c \
    "import sys, torch; assert sys.version_info[:2] == (${python/./, }), sys.version; print(torch.__version__)" 2>&1)" \
    || die "$base is not a Python $python image with torch on PATH ($(printf '%s' "$out" | grep -v -e '--help' -e '^$' | tail -n 1 | sed 's/.*exec: //' | cut -c1-160)): pass another $(flavor_base_setting "$flavor"), or remove it (docker rmi $base) so that it is made again"
  say "base $base ($flavor): torch $(printf '%s' "$out" | tail -n 1)"
}

# --- the job containers ---------------------------------------------------------------------------------

config() {
  cat <<EOF
run_id: $1
model: {name_or_path: tiny}
data: {source: synthetic, synthetic_rows: 400, max_length: 256}
train: {method: lora, max_steps: $STEPS, per_device_batch_size: 8, packing: none, logging_steps: 1,
        learning_rate: 3.0e-3, save_every_steps: 100000, early_stopping_patience: null,
        lora: {r: 8, alpha: 16, dropout: 0.0, modules_to_save: [embed_tokens, lm_head]}}
eval: {models: [base, merged], max_examples: 20, batch_size: 20, max_new_tokens: 32}
push: {repo_id: someone/t2s-smoke, dry_run: true, enforce_gates: false}  # a tiny model is below push.gates
EOF
}

# job NAME EXPECTED_RC DOCKER_RUN_ARGS...: runs a job container to its end, keeps its output in
# $WORK/logs/NAME.log (stdout and stderr as `docker logs` shows them) and checks its exit code.
job() {
  local name="$1" expected="$2" container="t2s-smoke-$$-$1" rc=0
  shift 2
  CONTAINERS+=("$container")
  docker run --name "$container" --network none -e HF_TOKEN="$SECRET" -e RUNPOD_API_KEY="$SECRET" "$@" \
    >/dev/null 2>&1 || rc=$?
  docker logs "$container" >"$WORK/logs/$name.log" 2>&1
  [ "$rc" = "$expected" ] || { tail -n 20 "$WORK/logs/$name.log" >&2; die "$name: exit code $rc, expected $expected (log: $WORK/logs/$name.log)"; }
}

expect() {  # expect CONDITION... -- MESSAGE
  local args=() message
  while [ "$1" != -- ]; do args+=("$1"); shift; done
  shift
  message="$*"
  "${args[@]}" || die "$message"
}

in_log() { grep -qE -- "$2" "$WORK/logs/$1.log"; }
last_line() { tail -n 1 "$WORK/logs/$1.log"; }
done_field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

# Runs a command as the owner of the volumes (a real non-root uid), to see what that user can do.
as_owner() {
  if [ "$(id -u):$(id -g)" = "$OWNER" ]; then
    "$@"
  else
    setpriv --reuid "${OWNER%:*}" --regid "${OWNER#*:}" --clear-groups "$@"
  fi
}

volume() {  # a fresh runs folder belonging to the owner
  install -d -m 755 -o "${OWNER%:*}" -g "${OWNER#*:}" "$WORK/$1"
  printf '%s' "$WORK/$1"
}

# --- main -----------------------------------------------------------------------------------------------

# export_smoke: docker run t2s:train, t2s:merge and t2s:export-$flavor (smoke_flavor's) on a tiny Llama with TinyLlama's
# published tokenizer (from ../shared, mounted read-only; the demo's tokenizer is trained at run time, which llama.cpp's
# converter refuses): f16, q8_0 and q4_k_m made, read back and run through llama.cpp inside the image, then a rerun
# skips. An 8-step model answers noise with near-ties, so only f16 must agree with the merged model. (issue 27)
export_smoke() {
  local tokenizer="$REPO/../shared/tokenizers/tinyllama-1.1b-chat" base="$WORK/export-base" vol run quant
  [ -d "$tokenizer" ] || die "the export stage needs TinyLlama's tokenizer in $tokenizer: put ../shared beside the checkout"
  [ -x "$REPO/.venv/bin/python" ] || die "the export stage needs .venv: run make install"
  PYTHONPATH="$REPO" "$REPO/.venv/bin/python" -c 'import sys; from pathlib import Path; from jobs.lib import tiny
tiny.save_tiny_base_with_tokenizer(Path(sys.argv[2]), Path(sys.argv[1]))' "$tokenizer" "$base" \
    >"$WORK/logs/export-base.log" 2>&1 || die "could not build the export stage's tiny model (log: $WORK/logs/export-base.log)"
  chmod -R a+rX "$base"
  vol="$(volume "vol-export-$flavor")"
  run="$vol/export"
  local yaml
  yaml="$(config export | sed 's|^model: .*|model: {name_or_path: /models/base}|; s|max_steps: [0-9]*|max_steps: 8|')
merge: {verify: false}
export: {quant: [f16, q8_0, q4_k_m], check_rows: 4, max_new_tokens: 16, min_agreement: {f16: 0.5, q8_0: 0.0, q4_k_m: 0.0}}"
  local mounts=(--user "$OWNER" -v "$vol:/workspace/runs" -v "$base:/models/base:ro" -e T2S_CONFIG_YAML="$yaml")
  job "export-train-$flavor" 0 "${mounts[@]}" "t2s:train-$flavor"
  job "export-merge-$flavor" 0 "${mounts[@]}" "t2s:merge-$flavor"
  job "export-$flavor" 0 "${mounts[@]}" "t2s:export-$flavor"
  for quant in f16 q8_0 q4_k_m; do
    expect test -s "$run/export/export.$quant.gguf" -- "t2s:export left no export.$quant.gguf (log: $WORK/logs/export-$flavor.log)"
  done
  expect test -f "$run/export/Modelfile" -a -f "$run/export.done" -- "t2s:export left no Modelfile or export.done"
  expect in_log "export-$flavor" "f16: read back ok, transformers identical, llama.cpp agrees on" -- "t2s:export did not check f16 through transformers and llama.cpp (log: $WORK/logs/export-$flavor.log)"
  expect in_log "export-$flavor" "q4_k_m: read back ok, llama.cpp agrees on" -- "t2s:export did not run q4_k_m through llama.cpp (log: $WORK/logs/export-$flavor.log)"
  job "export-again-$flavor" 0 "${mounts[@]}" "t2s:export-$flavor"
  expect in_log "export-again-$flavor" "export: already finished" -- "a second t2s:export did not skip the finished export"
}

# serve_smoke MERGED_DIR: docker run t2s:serve-$flavor (smoke_flavor's) on a merged model (host network, loopback, an API key), answered
# through the official openai client from .venv, then stopped: SIGTERM drains and exits 0. (issue 26)
serve_smoke() {
  local merged="$1" container="t2s-smoke-$$-serve-$flavor" port key tries rc
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  key="smoke-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
  CONTAINERS+=("$container")
  docker run -d --name "$container" --network host -e T2S_SERVE_API_KEY="$key" -v "$merged:/models:ro" \
    "t2s:serve-$flavor" --model /models --host 127.0.0.1 --port "$port" --max-tokens 16 >/dev/null
  for ((tries = 0; tries < 600; tries++)); do
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
      "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    [ "$(docker inspect --format '{{.State.Running}}' "$container")" = true ] || break
    sleep 0.5
  done
  T2S_URL="http://127.0.0.1:$port/v1" T2S_KEY="$key" "$REPO/.venv/bin/python" -c '
import os
from openai import OpenAI
client = OpenAI(base_url=os.environ["T2S_URL"], api_key=os.environ["T2S_KEY"], max_retries=0)
assert [m.id for m in client.models.list()] == ["/models"]
answer = client.chat.completions.create(model="/models", messages=[
    {"role": "system", "content": "CREATE TABLE t (a INTEGER)"}, {"role": "user", "content": "How many rows?"}])
print("serve answered:", repr(answer.choices[0].message.content))
' >"$WORK/logs/serve-client.log" 2>&1 || { docker logs "$container" >"$WORK/logs/serve.log" 2>&1; tail -n 20 "$WORK/logs/serve-client.log" "$WORK/logs/serve.log" >&2; die "t2s:serve did not answer the openai client (logs: $WORK/logs/serve*.log)"; }
  docker stop --time 60 "$container" >/dev/null
  rc="$(docker wait "$container")"
  docker logs "$container" >"$WORK/logs/serve.log" 2>&1
  expect test "$rc" = 0 -- "t2s:serve exit code $rc after docker stop, expected 0 (log: $WORK/logs/serve.log)"
  expect in_log serve "draining" -- "t2s:serve did not drain on SIGTERM (log: $WORK/logs/serve.log)"
}

# The build, the jobs, the secrets and the launch for one flavor, on its own images and volumes.
smoke_flavor() {
  local flavor="$1"
  FLAVOR_LABEL="$flavor: "
  local base setting
  base="$(flavor_base "$flavor")"
  setting="$(flavor_base_setting "$flavor")"
  stage "CPU base ($flavor)"
  if [ -n "${!setting:-}" ]; then
    has_image "$base" || die "base image $base ($setting) is not in the engine: build or load it first (docker images lists what is there), or unset $setting to make $(flavor_default_base "$flavor")"
    check_engine_disk "$NEED_GB"
  elif has_image "$base"; then
    check_engine_disk "$NEED_GB"
  else
    check_engine_disk "$(flavor_need_gb_with_base "$flavor")"
    has_image "$DEBIAN_BASE" || make_debian_base
    "make_torch_base_$flavor" "$base"
  fi
  check_base "$flavor" "$base"
  stage_done "CPU base"

  stage "make images ($flavor on $base, no flash-attn), from a copy of the tree with decoy secrets"
  if [ ! -d "$WORK/ctx" ]; then
    mkdir -p "$WORK/ctx"
    (cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf -) \
      | tar -C "$WORK/ctx" -xf - || die "cannot copy the tree's files (git ls-files in $REPO): is it a git checkout?"
    for decoy in .env configs/.env hf_token.txt; do
      printf 'HF_TOKEN=%s\nRUNPOD_API_KEY=%s\n' "$SECRET" "$SECRET" >"$WORK/ctx/$decoy"
    done
  fi
  (cd "$WORK/ctx" && HF_TOKEN="$SECRET" RUNPOD_API_KEY="$SECRET" make images FLAVOR="$flavor" BASE_IMAGE="$base" \
    FLASH_ATTN_WHEEL= BUILD_NETWORK=host) 2>&1 | timestamped >"$WORK/logs/build-$flavor.log" \
    || build_failed "the t2s $flavor images" "$WORK/logs/build-$flavor.log"
  local image
  for image in "${JOBS[@]}"; do
    expect has_image "t2s:$image" -- "make images did not tag t2s:$image"
    expect has_image "t2s:$image-$flavor" -- "make images did not tag t2s:$image-$flavor"
  done
  docker history "t2s:train-$flavor" >"$WORK/logs/history-$flavor.txt"
  say "t2s:train-$flavor is $(docker image inspect --format '{{.Size}}' "t2s:train-$flavor" | awk '{ printf "%.2f GB", $1 / 1e9 }')"
  stage_done "make images"

  # The jobs run this flavor's images (t2s:<job>-<flavor>), each on volumes of its own.
  local vol_main vol_pipe out
  vol_main="$(volume "vol-main-$flavor")"
  vol_pipe="$(volume "vol-pipe-$flavor")"
  local main_run="$vol_main/main" pipe_run="$vol_pipe/pipe" as_user=(--user "$OWNER")

  stage "docker run t2s:train on a fresh volume as $OWNER, stopped (SIGTERM) mid-training"
  local trainer="t2s-smoke-$$-$flavor-train-stopped" step="" tries rc
  CONTAINERS+=("$trainer")
  docker run -d --name "$trainer" --network none -e HF_TOKEN="$SECRET" -e RUNPOD_API_KEY="$SECRET" "${as_user[@]}" \
    -v "$vol_main:/workspace/runs" -e T2S_CONFIG_YAML="$(config main)" "t2s:train-$flavor" >/dev/null
  for ((tries = 0; tries < 1200; tries++)); do
    step="$(docker logs "$trainer" 2>&1 | grep -oE 'step [0-9]+/' | tail -n 1 | tr -dc 0-9 || true)"
    [ -n "$step" ] && [ "$step" -ge 5 ] && break
    [ "$(docker inspect --format '{{.State.Running}}' "$trainer")" = true ] || break
    sleep 0.5
  done
  docker stop --time 120 "$trainer" >/dev/null
  rc="$(docker wait "$trainer")"
  docker logs "$trainer" >"$WORK/logs/train-stopped-$flavor.log" 2>&1
  [ -n "$step" ] && [ "$step" -ge 5 ] || die "train-stopped: training never reached step 5 before the container ended (log: $WORK/logs/train-stopped-$flavor.log)"
  expect test "$(grep -c 'prep has not run' "$WORK/logs/train-stopped-$flavor.log")" = 1 -- "train on a fresh volume did not say once that prep has not run"
  expect in_log "train-stopped-$flavor" "prep has not run in runs/main: running t2s prep first" -- "train on a fresh volume did not say it runs prep first"
  expect test -f "$main_run/prep.done" -a -f "$main_run/data/manifest.json" -- "prep did not run before train on a fresh volume"
  expect in_log "train-stopped-$flavor" "SIGTERM: checkpoint saved" -- "the training container did not checkpoint on SIGTERM (log: $WORK/logs/train-stopped-$flavor.log)"
  expect test "$rc" != 0 -a "$rc" != 137 -- "docker stop: exit code $rc (0: it finished anyway; 137: killed, not stopped cleanly)"
  expect test ! -e "$main_run/train.done" -- "a stopped training wrote train.done"
  local checkpoint
  checkpoint="$(find "$main_run/checkpoints" -maxdepth 1 -name 'checkpoint-*' -printf '%f\n' 2>/dev/null | sort -t- -k2 -n | tail -n 1 || true)"
  expect test -n "$checkpoint" -- "no checkpoint after the SIGTERM in $main_run/checkpoints"
  expect test "${checkpoint#checkpoint-}" -ge 5 -a "${checkpoint#checkpoint-}" -lt "$STEPS" -- "no checkpoint from the SIGTERM (found: ${checkpoint:-none})"
  expect grep -q "^t2s train: error: training was stopped (SIGTERM)" <(last_line "train-stopped-$flavor") -- "the stopped container's last line is not its error: $(last_line "train-stopped-$flavor")"
  stage_done "train stopped at step $step, ${checkpoint} saved, exit code $rc"

  stage "docker run t2s:train again: resumes from $checkpoint"
  job "train-resumed-$flavor" 0 "${as_user[@]}" -v "$vol_main:/workspace/runs" -e T2S_CONFIG_YAML="$(config main)" "t2s:train-$flavor"
  expect in_log "train-resumed-$flavor" "resuming from runs/main/checkpoints/$checkpoint" -- "the second train did not resume from $checkpoint"
  expect test "$(grep -c 'prep has not run' "$WORK/logs/train-resumed-$flavor.log")" = 0 -- "train ran prep again although it had finished"
  expect test -f "$main_run/train.done" -a -f "$main_run/adapter/adapter_model.safetensors" -- "no adapter after the resumed training"
  local resumed_steps
  resumed_steps="$(done_field "$main_run/train.done" global_step)"
  stage_done "train resumed to step $resumed_steps"

  stage "docker run t2s:merge, t2s:eval, t2s:push (dry run)"
  job "merge-$flavor" 0 "${as_user[@]}" -v "$vol_main:/workspace/runs" -e T2S_CONFIG_YAML="$(config main)" "t2s:merge-$flavor"
  expect test -f "$main_run/merge.done" -a -f "$main_run/merged/model.safetensors" -- "merge left no merged model"
  job "eval-$flavor" 0 "${as_user[@]}" -v "$vol_main:/workspace/runs" -e T2S_CONFIG_YAML="$(config main)" "t2s:eval-$flavor"
  expect test -f "$main_run/eval.done" -a -f "$main_run/eval/report.json" -a -f "$main_run/eval/metrics.png" -- "eval left no report"
  job "push-$flavor" 0 "${as_user[@]}" -v "$vol_main:/workspace/runs" -e T2S_CONFIG_YAML="$(config main)" "t2s:push-$flavor"
  expect in_log "push-$flavor" "dry run: [0-9]+ files .* would go to someone/t2s-smoke" -- "push's dry run did not list what it would upload"
  expect test -f "$main_run/push/README.md" -- "push's dry run wrote no model card"
  stage_done "merge, eval, push"

  if [ "$flavor" = cu12 ]; then  # llama.cpp's pair is baked into the cu12 image (images/Dockerfile)
    stage "docker run t2s:train, t2s:merge, t2s:export on a tiny Llama with TinyLlama's tokenizer"
    export_smoke
    stage_done "export: f16, q8_0, q4_k_m checked in the image; a rerun skips"
  fi

  stage "docker run t2s:serve on the merged model, answered through the openai client"
  serve_smoke "$main_run/merged"
  stage_done "serve"

  stage "docker run t2s:prep, then t2s:pipeline (as root, T2S_OWNER=$OWNER)"
  job "prep-$flavor" 0 -e T2S_OWNER="$OWNER" -v "$vol_pipe:/workspace/runs" -e T2S_CONFIG_YAML="$(config pipe)" "t2s:prep-$flavor"
  expect test -f "$pipe_run/prep.done" -a -d "$pipe_run/data/tokenized/train" -- "prep left no tokenized data"
  job "pipeline-$flavor" 0 -e T2S_OWNER="$OWNER" -v "$vol_pipe:/workspace/runs" -e T2S_CONFIG_YAML="$(config pipe)" "t2s:pipeline-$flavor"
  expect in_log "pipeline-$flavor" "prep: already finished" -- "the pipeline redid the prep that had finished in another container"
  local f
  for f in train.done merge.done eval.done eval/report.json push/README.md; do
    expect test -f "$pipe_run/$f" -- "the pipeline left no $f"
  done
  local straight_steps
  straight_steps="$(done_field "$pipe_run/train.done" global_step)"
  expect test "$straight_steps" = "$STEPS" -a "$resumed_steps" = "$straight_steps" -- "steps: resumed run $resumed_steps, uninterrupted run $straight_steps (both should be $STEPS)"
  stage_done "prep + pipeline; $straight_steps steps uninterrupted = $resumed_steps resumed"

  stage "a failing job: docker run t2s:merge before any training"
  job "failing-$flavor" 2 -e T2S_CONFIG_YAML="$(config nothing-trained)" "t2s:merge-$flavor"
  expect grep -q "^t2s merge: error: merge needs a finished train" <(last_line "failing-$flavor") -- "the failing container's last line is not its one-line error: $(last_line "failing-$flavor")"
  stage_done "failing job: exit code 2, its error last"

  stage "no secret in the images, their history, the run's files or the logs"
  for image in "${JOBS[@]}"; do
    docker history --no-trunc "t2s:$image-$flavor" >>"$WORK/logs/history-no-trunc.txt"
  done
  expect test "$(grep -c -F -- "$SECRET" "$WORK/logs/history-no-trunc.txt" || true)" = 0 -- "a secret is in docker history"
  local hits
  local tags=()
  for image in "${JOBS[@]}"; do tags+=("t2s:$image-$flavor"); done
  docker save "${tags[@]}" | { grep -caF -- "$SECRET" || true; } >"$WORK/hits" \
    || die "docker save of the t2s images failed"
  hits="$(cat "$WORK/hits")"
  expect test "${hits:-0}" = 0 -- "a secret is in the saved images' layers or configs ($hits hits)"
  local vol_export=(); [ -d "$WORK/vol-export-$flavor" ] && vol_export=("$WORK/vol-export-$flavor")
  out="$(grep -rlF --exclude=history-no-trunc.txt -- "$SECRET" "$vol_main" "$vol_pipe" "${vol_export[@]}" "$WORK/logs" || true)"
  expect test -z "$out" -- "a secret is in these files: $out"
  stage_done "secrets"

  stage "files on the volumes are $OWNER's to read and delete"
  out="$(find "$main_run" "$pipe_run" ! -user "${OWNER%:*}" 2>&1 | head -n 3 || true)"
  expect test -z "$out" -- "files not owned by $OWNER: $out"
  out="$(as_owner find "$main_run" "$pipe_run" ! -readable 2>&1 | head -n 3 || true)"
  expect test -z "$out" -- "files $OWNER cannot read: $out"
  expect as_owner rm -rf "$main_run" "$pipe_run" -- "$OWNER cannot delete the run dirs"
  expect test ! -e "$main_run" -a ! -e "$pipe_run" -- "the run dirs are still there after $OWNER deleted them"
  stage_done "ownership (--user for the first run, T2S_OWNER for the second)"

  if [ -f "$REPO/tests/test_launch_e2e.py" ]; then
    # cu12 runs every scenario; another flavor the card's config (configs/l4x2-qlora.yaml) launched on its image.
    local selection=()
    [ "$flavor" = cu12 ] || selection=(-k cards_two_gpu)
    stage "launch end to end: tests/test_launch_e2e.py ${selection[*]} with T2S_POD_IMAGE=t2s:pipeline-$flavor"
    [ -x "$REPO/.venv/bin/pytest" ] || die "tests/test_launch_e2e.py needs .venv: run make install"
    (cd "$REPO" && T2S_POD_IMAGE="t2s:pipeline-$flavor" T2S_POD_FLAVOR="$flavor" \
      DOCKER_HOST="${DOCKER_HOST:-unix:///var/run/docker.sock}" PYTHONPATH="$REPO" \
      .venv/bin/pytest -q tests/test_launch_e2e.py "${selection[@]}") \
      || die "tests/test_launch_e2e.py failed against t2s:pipeline-$flavor"
    stage_done "launch end to end"
  fi
  FLAVOR_LABEL=""
}

main() {
  local started=$SECONDS
  trap cleanup EXIT
  trap 'ERROR="interrupted"; exit 130' INT
  trap 'ERROR="stopped (SIGTERM)"; exit 143' TERM
  mkdir -p "$CACHE" || die "cannot create T2S_SMOKE_CACHE=$CACHE"
  exec 9>"$CACHE/lock"
  flock -n 9 || die "another image-smoke is running on $CACHE: wait for it, or set T2S_SMOKE_CACHE to another folder"
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/t2s-image-smoke.XXXXXX")"
  chmod 755 "$WORK"  # the volumes' owner must reach them
  mkdir -p "$WORK/logs"
  check_disk "$WORK" 1 "the work dir (runs volumes, logs)" "set TMPDIR to a bigger disk"
  SECRET="hf_smoke$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  if [ "$(id -u)" = 0 ]; then OWNER="${T2S_SMOKE_OWNER:-4242:4242}"; else OWNER="$(id -u):$(id -g)"; fi
  [[ "$OWNER" =~ ^[0-9]+:[0-9]+$ ]] || die "T2S_SMOKE_OWNER=$OWNER is not uid:gid"

  local flavor
  for flavor in "${FLAVORS[@]}"; do
    [ -n "$(flavor_python "$flavor")" ] || die "T2S_SMOKE_FLAVORS: '$flavor' is not a flavor (cu12, cu118)"
  done

  stage "engine"
  use_engine
  stage_done "engine"

  for flavor in "${FLAVORS[@]}"; do
    say "--- flavor $flavor ---"
    smoke_flavor "$flavor"
  done

  FAILED=0
  say "all checks passed in $((SECONDS - started))s:"
  printf '%s\n' "${TIMES[@]}"
}

main "$@"
