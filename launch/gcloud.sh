#!/usr/bin/env bash
# SC2317: the cmd_* functions are called as "cmd_$c". SC2088: a quoted ~ is meant for the worker's
# shell, which expands it there.
# shellcheck disable=SC2317,SC2088
# Launches turbos-jax training on a Cloud TPU VM slice (one or many hosts) with gcloud.
#
# Every worker of a slice runs the same command; the trainer joins them into one JAX job on its own
# (turbos_jax/distributed.py detects the slice), so this script only creates the VMs, installs the
# package into a Python 3.11 virtual environment on each worker, starts the trainer everywhere with a
# log per worker, copies the logs back, and deletes the slice. `--dry-run` prints each command instead
# of running it. See `--help` and README.md ("Launching on a TPU pod").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="turbos-jax"      # the code on each worker, relative to the home directory
REMOTE_VENV="turbos-venv"    # its virtual environment
REMOTE_LOGS="turbos-logs"    # train-<hostname>.log per worker

usage() {
  cat <<'EOF'
Usage: launch/gcloud.sh [FLAGS] COMMAND... [-- TRAINER_FLAGS...]

Commands (run in the order given):
  create    create the TPU VM slice (gcloud compute tpus tpu-vm create)
  install   put this code on every worker and pip install it into ~/turbos-venv (Python 3.11)
  train     run `python -m turbos_jax.train` on every worker, then copy the logs back (logs)
  logs      copy every worker's ~/turbos-logs/train-<hostname>.log into --logs-dir
  stop      stop the slice's VMs (single-host slices only; a stopped slice keeps its disks)
  delete    delete the slice
  all       create install train delete (the slice is deleted even if training fails)

Flags:
  --name NAME              TPU VM name (required)
  --zone ZONE              e.g. us-east5-a (required)
  --project PROJECT        Cloud project (default: gcloud's configured project)
  --accelerator-type TYPE  e.g. v5p-16, v5litepod-16, v6e-8, v4-32 (required by create)
  --version RUNTIME        TPU software version (default by type: v4 tpu-ubuntu2204-base,
                           v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e)
  --spot                   create Spot VMs (cheaper, preemptible; rerun to resume from the last checkpoint)
  --git-url URL[@REF]      install from this git repository (default: copy the local checkout,
                           tracked and untracked-but-not-ignored files)
  --python-version X.Y     Python for the workers' virtual environment (default 3.11, via uv)
  --config PATH            trainer config, relative to the repository (required by train)
  --workdir PATH           trainer workdir; must be ONE directory shared by all workers, e.g. a
                           gcsfuse-mounted bucket or a Filestore/NFS mount (required by train)
  --detach                 start the trainer in the background (nohup) and return; fetch the
                           logs later with `logs`
  --logs-dir DIR           where `logs` puts the workers' logs (default: logs/NAME)
  --dry-run                print every command (one per line) instead of running it
  -h, --help               this help

Everything after `--` is passed to the trainer, e.g. -- --config.total_steps=1000.

Example:
  launch/gcloud.sh --name=tjax --zone=us-east5-a --accelerator-type=v5p-16 --spot \
      --config=configs/small.py --workdir=/mnt/bucket/run1 all -- --config.total_steps=2000
EOF
}

die() { echo "error: $*" >&2; exit 2; }

# One argument quoted for a POSIX shell, left bare when that is unambiguous (readable dry runs).
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints the command (dry run) or runs it.
run() {
  if ((DRY_RUN)); then
    local out="" a
    for a in "$@"; do out+="${out:+ }$(q "$a")"; done
    printf '%s\n' "$out"
  else
    "$@"
  fi
}

NAME="" ZONE="" PROJECT="" ACCEL="" VERSION="" GIT_URL="" CONFIG="" WORKDIR="" LOGS_DIR=""
PY_VERSION="3.11" SPOT=0 DETACH=0 DRY_RUN=0
COMMANDS=() TRAIN_ARGS=()

while (($#)); do
  arg=$1
  shift
  if [[ $arg == --*=* ]]; then
    key=${arg%%=*} val=${arg#*=} has_val=1
  else
    key=$arg val="" has_val=0
  fi
  case $key in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --detach) DETACH=1 ;;
    --name | --zone | --project | --accelerator-type | --version | --git-url | --python-version | \
      --config | --workdir | --logs-dir)
      if ((!has_val)); then
        (($#)) || die "$key needs a value"
        val=$1
        shift
      fi
      [[ -n $val ]] || die "$key needs a non-empty value"
      case $key in
        --name) NAME=$val ;;
        --zone) ZONE=$val ;;
        --project) PROJECT=$val ;;
        --accelerator-type) ACCEL=$val ;;
        --version) VERSION=$val ;;
        --git-url) GIT_URL=$val ;;
        --python-version) PY_VERSION=$val ;;
        --config) CONFIG=$val ;;
        --workdir) WORKDIR=$val ;;
        --logs-dir) LOGS_DIR=$val ;;
      esac
      ;;
    --) TRAIN_ARGS=("$@"); break ;;
    -*) die "unknown flag $key (see --help)" ;;
    create | install | train | logs | stop | delete) COMMANDS+=("$key") ;;
    all) COMMANDS+=(create install train delete) ;;
    *) die "unknown command '$key' (commands: create install train logs stop delete all; see --help)" ;;
  esac
done

((${#COMMANDS[@]})) || die "no command given (commands: create install train logs stop delete all; see --help)"
[[ -n $NAME ]] || die "--name is required"
[[ -n $ZONE ]] || die "--zone is required"
LOGS_DIR=${LOGS_DIR:-logs/$NAME}
for c in "${COMMANDS[@]}"; do  # check every command's flags before anything runs
  case $c in
    create) [[ -n $ACCEL ]] || die "create needs --accelerator-type (e.g. v5p-16)" ;;
    train)
      [[ -n $CONFIG ]] || die "train needs --config (e.g. configs/small.py)"
      [[ -n $WORKDIR ]] || die "train needs --workdir (a directory shared by all workers)"
      ;;
  esac
done
if [[ -n $ACCEL && -z $VERSION ]]; then
  case $ACCEL in
    v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "--version is required for accelerator type $ACCEL" ;;
  esac
fi

LOCATION=(--zone="$ZONE")
[[ -n $PROJECT ]] && LOCATION+=(--project="$PROJECT")

tpu() { run gcloud compute tpus tpu-vm "$@" "${LOCATION[@]}"; }
on_all_workers() { tpu ssh "$NAME" --worker=all --command "$1"; }

# Python 3.11+ on every worker (TPU VM images ship an older python3): uv (from PyPI) provides it.
SETUP_VENV="command -v uv >/dev/null || python3 -m pip install --user --quiet uv; \
export PATH=\$HOME/.local/bin:\$PATH; uv venv --allow-existing --python $(q "$PY_VERSION") ~/$REMOTE_VENV; \
uv pip install --python ~/$REMOTE_VENV/bin/python -e \"\$HOME/${REMOTE_DIR}[tpu]\""

cmd_create() {
  local args=(create "$NAME" --accelerator-type="$ACCEL" --version="$VERSION")
  ((SPOT)) && args+=(--spot)
  tpu "${args[@]}"
}

cmd_install() {
  if [[ -n $GIT_URL ]]; then
    local url=$GIT_URL ref=""
    if [[ $GIT_URL =~ ^(.+)@([^@/:]+)$ ]]; then  # URL@REF (not the user@ of an ssh URL)
      url=${BASH_REMATCH[1]} ref=${BASH_REMATCH[2]}
    fi
    local fetch
    fetch="rm -rf ~/$REMOTE_DIR && git clone --quiet $(q "$url") ~/$REMOTE_DIR"
    [[ -n $ref ]] && fetch+=" && git -C ~/$REMOTE_DIR checkout --quiet $(q "$ref")"
    on_all_workers "set -e; $fetch; $SETUP_VENV"
  else
    local tarball
    tarball="${TMPDIR:-/tmp}/turbos-jax-$NAME.tar.gz"
    if ((DRY_RUN)); then
      echo "git -C $(q "$ROOT") ls-files -z --cached --others --exclude-standard | tar -czf $(q "$tarball") -C $(q "$ROOT") --null -T -"
    else
      # Files deleted but not yet committed are still listed by git; tar must not see them.
      git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
        (cd "$ROOT" && while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done) |
        tar -czf "$tarball" -C "$ROOT" --null -T -
    fi
    tpu scp "$tarball" "$NAME:$REMOTE_DIR.tar.gz" --worker=all
    on_all_workers "set -e; rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && \
tar -xzf ~/$REMOTE_DIR.tar.gz -C ~/$REMOTE_DIR; $SETUP_VENV"
  fi
}

cmd_train() {
  local trainer a
  trainer="~/$REMOTE_VENV/bin/python -m turbos_jax.train --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR")"
  for a in "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"; do trainer+=" $(q "$a")"; done
  local log="~/$REMOTE_LOGS/train-\$(hostname).log"
  local prefix="set -o pipefail; mkdir -p ~/$REMOTE_LOGS && cd ~/$REMOTE_DIR && "
  if ((DETACH)); then
    on_all_workers "${prefix}nohup $trainer > $log 2>&1 < /dev/null &"
    return
  fi
  local status=0
  on_all_workers "${prefix}$trainer 2>&1 | tee $log" || status=$?
  cmd_logs
  return "$status"
}

cmd_logs() {
  run mkdir -p "$LOGS_DIR"
  # Log names carry the worker's hostname, so one copy from all workers lands side by side.
  tpu scp "$NAME:$REMOTE_LOGS/*" "$LOGS_DIR/" --worker=all
}

cmd_stop() { tpu stop "$NAME"; }
cmd_delete() { tpu delete "$NAME" --quiet; }

# Each command runs in a subshell with -e in force (bash ignores -e inside `f || ...`), so its first
# failing step stops it; after a failure only `delete` still runs (an idle slice costs money).
status=0
for c in "${COMMANDS[@]}"; do
  if [[ $c == delete || $status == 0 ]]; then
    set +e
    (set -e; "cmd_$c")
    rc=$?
    set -e
    ((status)) || status=$rc
  fi
done
exit "$status"
