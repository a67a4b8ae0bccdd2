#!/usr/bin/env bash
# Cloud TPU VM slices for bf16jax: create, install, run the same command on every worker, follow,
# stop, delete. Every worker runs `python -m bf16jax.main` with the same flags; with
# --config.mesh.distributed=yes each calls jax.distributed.initialize(), which finds the slice's
# workers from the TPU metadata; each loads only its share of every batch; checkpoints go to a
# shared gs:// workdir, and rerunning `run` with the same WORKDIR resumes from the newest one.
# See experiments/tpu/README.md for v4-32 and v5e-64 walkthroughs.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: experiments/tpu/launch.sh COMMAND        (run from anywhere inside the bf16jax checkout)

Commands:
  create    create the TPU VM slice (ACCELERATOR; RUNTIME chosen from it unless set)
  install   copy this checkout (git archive of HEAD, or REPO_URL) to every worker and install it
            in ~/bf16jax/.venv (Python 3.11 via uv, jax[tpu], gcsfs, google-cloud-storage)
  run       start training on every worker in the background (log: ~/bf16jax.log on each)
  logs      follow worker 0's log (WORKER=n for another)
  status    show whether training runs on each worker and the tail of its log
  stop      stop training on every worker (the PID saved by `run`): SIGTERM, SIGKILL after
            STOP_WAIT seconds (default 60)
  delete    delete the TPU VM slice

Environment (required: TPU_NAME, ZONE; WORKDIR for run; ACCELERATOR for create):
  TPU_NAME     name of the TPU VM slice, e.g. bf16jax-v4-32
  ZONE         e.g. us-central2-b (v4), us-west4-a (v5e)
  PROJECT      Google Cloud project (default: gcloud's configured project)
  ACCELERATOR  e.g. v4-32, v5litepod-64, v5p-32, v6e-64
  RUNTIME      TPU software version; default from ACCELERATOR: v4 tpu-ubuntu2204-base,
               v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  SPOT=1       create a Spot slice (preemptible; resume with `run` after re-creating it)
  REPO_URL     git URL to clone on the workers instead of copying this checkout's HEAD
  REPO_REF     branch / tag / commit to check out with REPO_URL (default: the default branch)
  CONFIG       config file, relative to the repository (default: configs/gpt_1b.py)
  WORKDIR      shared run directory, gs://BUCKET/PATH (checkpoints, TensorBoard events)
  EXTRA_ARGS   more flags for bf16jax.main, split by the worker's shell, e.g.
               "--config.train.steps=2000 --config.precision=bf16-pure"
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

need() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "set $name (see: $0 --help)"
  done
}

gcloud_tpu() {
  # gcloud compute tpus tpu-vm SUBCOMMAND [ARGS...] with the zone and project filled in.
  local sub=$1
  shift
  local args=(compute tpus tpu-vm "$sub" "$@" --zone="$ZONE")
  [[ -n "${PROJECT:-}" ]] && args+=(--project="$PROJECT")
  gcloud "${args[@]}"
}

on_workers() {
  # Runs a bash script (one argument) on every worker, or on worker WORKER. It travels base64
  # encoded, so no quoting survives two shells (local and remote) by accident.
  local worker=${WORKER:-all} encoded
  encoded=$(printf '%s\n' "$1" | base64 -w0)
  gcloud_tpu ssh "$TPU_NAME" --worker="$worker" --command="echo $encoded | base64 -d | bash"
}

default_runtime() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default RUNTIME for ACCELERATOR=$1: set RUNTIME (see the Cloud TPU runtime docs)" ;;
  esac
}

cmd_create() {
  need TPU_NAME ZONE ACCELERATOR
  local runtime=${RUNTIME:-}
  # Not inside `local`, whose status would hide default_runtime's exit.
  [[ -n "$runtime" ]] || runtime=$(default_runtime "$ACCELERATOR")
  local args=(--accelerator-type="$ACCELERATOR" --version="$runtime")
  [[ "${SPOT:-0}" == 1 ]] && args+=(--spot)
  gcloud_tpu create "$TPU_NAME" "${args[@]}"
}

cmd_install() {
  need TPU_NAME ZONE
  local fetch
  if [[ -n "${REPO_URL:-}" ]]; then
    local ref=${REPO_REF:-}
    fetch="rm -rf ~/bf16jax && git clone --quiet $(printf '%q' "$REPO_URL") ~/bf16jax"
    [[ -n "$ref" ]] && fetch+=" && git -C ~/bf16jax checkout --quiet $(printf '%q' "$ref")"
  else
    local root tarball
    root=$(git rev-parse --show-toplevel) || die "run inside the bf16jax checkout, or set REPO_URL"
    if [[ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]]; then
      echo "warning: uncommitted changes are not copied (git archive of HEAD)" >&2
    fi
    tarball=$(mktemp --suffix=.tar.gz)
    # Expanded now: `tarball` is local and gone when the EXIT trap runs.
    # shellcheck disable=SC2064
    trap "rm -f $(printf '%q' "$tarball")" EXIT
    git -C "$root" archive --format=tar.gz -o "$tarball" HEAD
    gcloud_tpu scp "$tarball" "$TPU_NAME:bf16jax.tar.gz" --worker=all
    fetch="rm -rf ~/bf16jax && mkdir ~/bf16jax && tar xzf ~/bf16jax.tar.gz -C ~/bf16jax"
  fi
  # jax 0.10 needs Python >= 3.11; the TPU images ship 3.10, so uv provides 3.11 in a venv.
  on_workers "set -euo pipefail
$fetch
python3 -m pip install --quiet --user --upgrade uv
~/.local/bin/uv venv --quiet --python 3.11 ~/bf16jax/.venv
~/.local/bin/uv pip install --quiet --python ~/bf16jax/.venv/bin/python -e ~/bf16jax \
  'jax[tpu]==0.10.2' gcsfs google-cloud-storage
~/bf16jax/.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)'"
}

cmd_run() {
  need TPU_NAME ZONE WORKDIR
  local config=${CONFIG:-configs/gpt_1b.py} root
  if [[ -z "${REPO_URL:-}" ]]; then  # the workers run this checkout's HEAD
    root=$(git rev-parse --show-toplevel 2>/dev/null) || root=.
    [[ -f "$root/$config" ]] || die "CONFIG=$config is not a file in $root"
  fi
  [[ "$WORKDIR" == gs://* ]] ||
    echo "warning: WORKDIR=$WORKDIR is not gs://: every worker must see the same directory" >&2
  local flags=(--config="$config" --workdir="$WORKDIR" --config.mesh.distributed=yes)
  local cmd
  # EXTRA_ARGS is appended as is: the worker's shell splits (and unquotes) it.
  cmd="$(printf '%q ' .venv/bin/python -m bf16jax.main "${flags[@]}")${EXTRA_ARGS:-}"
  # setsid + nohup: training survives the ssh session; the PID file lets `stop` end just it.
  on_workers "set -euo pipefail
cd ~/bf16jax
[[ -f $(printf '%q' "$config") ]] || { echo \"\$(hostname): no $config in ~/bf16jax\" >&2; exit 1; }
if [[ -f ~/bf16jax.pid ]] && kill -0 \"\$(cat ~/bf16jax.pid)\" 2>/dev/null; then
  echo \"\$(hostname): already running (pid \$(cat ~/bf16jax.pid)): stop it first\" >&2
  exit 1
fi
setsid nohup $cmd > ~/bf16jax.log 2>&1 < /dev/null &
echo \$! > ~/bf16jax.pid
echo \"\$(hostname): started pid \$!\""
}

cmd_logs() {
  need TPU_NAME ZONE
  WORKER=${WORKER:-0} on_workers "tail -n 100 -F ~/bf16jax.log"
}

cmd_status() {
  need TPU_NAME ZONE
  on_workers "if [[ -f ~/bf16jax.pid ]] && kill -0 \"\$(cat ~/bf16jax.pid)\" 2>/dev/null; then
  echo \"\$(hostname): running (pid \$(cat ~/bf16jax.pid))\"
else
  echo \"\$(hostname): not running\"
fi
tail -n 3 ~/bf16jax.log 2>/dev/null || true"
}

cmd_stop() {
  need TPU_NAME ZONE
  local wait_s=${STOP_WAIT:-60}
  [[ "$wait_s" =~ ^[0-9]+$ ]] || die "STOP_WAIT=$wait_s must be a number of seconds"
  # SIGTERM first: with jax.distributed up, JAX takes it as a preemption notice and Orbax saves
  # a checkpoint at the next step all workers reach; after STOP_WAIT seconds, SIGKILL. A step
  # directory is trusted only once committed, so a kill mid-save loses nothing older.
  on_workers "pid=\$(cat ~/bf16jax.pid 2>/dev/null || true)
if [[ -n \"\$pid\" ]] && kill -0 \"\$pid\" 2>/dev/null; then
  kill -TERM -- -\"\$pid\"
  for _ in \$(seq $wait_s); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done
  kill -0 \"\$pid\" 2>/dev/null && kill -KILL -- -\"\$pid\"
  echo \"\$(hostname): stopped\"
else
  echo \"\$(hostname): not running\"
fi
rm -f ~/bf16jax.pid"
}

cmd_delete() {
  need TPU_NAME ZONE
  gcloud_tpu delete "$TPU_NAME" --quiet
}

main() {
  local command=${1:-}
  case "$command" in
    create | install | run | logs | status | stop | delete) "cmd_$command" ;;
    -h | --help | help) usage ;;
    "") usage >&2 && exit 2 ;;
    *) usage >&2 && die "unknown command '$command'" ;;
  esac
}

main "$@"
