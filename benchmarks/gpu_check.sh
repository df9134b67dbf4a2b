#!/usr/bin/env bash
# One-command accelerator check: every GPU-only test class, the model-level Pallas tests and
# benchmarks/kernels.py on this machine's GPU, written up in OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Needs only a python3 with jax (and its CUDA plugin, for a GPU); no network. Packages the project
# needs and the machine lacks are installed from a wheel folder built elsewhere by
# benchmarks/gpu_wheelhouse.sh (default: wheelhouse/ in the repository) into a private folder on
# PYTHONPATH, never over the machine's jax. Writes OUTDIR/report.md, OUTDIR/report.json and
# OUTDIR/logs.tar.gz, rewritten after every phase; every phase is time-boxed and the whole check
# ends within GPU_CHECK_DEADLINE_S seconds (default 480). A failing phase is recorded and the next
# one runs. Exit status: 0 PASS, 1 FAIL (see the report's problems), 2 NO GPU (JAX sees none: the
# GPU phases are replaced by quick CPU ones, which is how tests/test_gpu_check.py runs it).
#
# Environment (all optional): GPU_CHECK_PYTHON (an interpreter to try first), GPU_CHECK_WHEELHOUSE,
# GPU_CHECK_DEADLINE_S, GPU_CHECK_KERNELS_ARGS (extra flags for kernels.py), GPU_CHECK_KEEP_WORK=1
# (keep the scratch folder). docs/kernels.md, "Checking on a GPU", has the device call.
# shellcheck disable=SC2317  # functions reached through trap and run_step
set -u -o pipefail

if [[ $# -ne 1 || $1 == -* ]]; then
  sed -n '2,/^set /p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 64
fi
START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER=$REPO/benchmarks/gpu_check.py
if ! mkdir -p "$1" || ! OUTDIR=$(cd "$1" && pwd); then
  echo "cannot create $1" >&2
  exit 64
fi
WHEELHOUSE=${GPU_CHECK_WHEELHOUSE:-$REPO/wheelhouse}
DEADLINE=$((START + ${GPU_CHECK_DEADLINE_S:-480}))
RESERVE=15 # seconds kept for the last report
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SITE=$WORK/site
cd "$REPO" || exit 64
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

say() { printf '[%4ds] %s\n' "$(($(date +%s) - START))" "$*"; }

record() { # name status rc seconds limit note
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/phases.tsv"
}

report() { # [--final]
  "${PY:-python3}" "$HELPER" report --work "$WORK" --out "$OUTDIR" "$@" 2>>"$WORK/report-errors.log"
}

finish() {
  local rc
  report --final
  rc=$?
  say "report: $OUTDIR/report.md (exit $rc)"
  if [[ ${GPU_CHECK_KEEP_WORK:-0} == 1 ]]; then
    say "scratch folder kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}

# run_step NAME LIMIT CMD...: CMD with its output in WORK/NAME.log, stopped (SIGINT, then SIGKILL)
# after LIMIT seconds or at the deadline, whichever comes first; recorded, then the report rewritten.
run_step() {
  local name=$1 limit=$2 left t0 rc ms status log
  shift 2
  left=$((DEADLINE - RESERVE - $(date +%s)))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    record "$name" not_run "" 0 0 "no time left before the deadline"
    say "$name: not run, no time left"
    return 1
  fi
  log=$WORK/${name//:/-}.log
  say "$name: running (limit ${limit}s)"
  t0=$(date +%s%N)
  timeout -s INT -k 20 "$limit" "$@" >"$log" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))" "$limit" "${STEP_NOTE:-}"
  say "$name: $status (rc $rc, $((ms / 1000)) s)"
  [[ $status == ok ]] || tail -n 5 "$log" | sed 's/^/    /'
  report
  return "$rc"
}

# pytest_step NAME LIMIT PYTEST_ARGS...: pytest with a junit file (SIGINT handled even where the
# caller ignores it, so a timed-out run still writes the tests done); rerun once without
# tests/conftest.py if this jaxlib rejects an XLA flag that conftest.py sets.
PYTEST_MAIN='import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))'
pytest_step() {
  local name=$1 limit=$2 junit
  shift 2
  junit=$WORK/junit-${name//:/-}.xml
  STEP_NOTE=${PT_NOTE:-} run_step "$name" "$limit" "$PY" -c "$PYTEST_MAIN" -p no:cacheprovider -v -rA \
    -m "" --tb=short --junitxml="$junit" "$@" && return 0
  if [[ ! -s $junit && " $* " != *" --noconftest "* ]] && grep -q "Unknown flag" "$WORK/${name//:/-}.log"; then
    PT_NOTE="rerun without tests/conftest.py, whose XLA_FLAGS this jaxlib does not know" \
      pytest_step "$name-noconftest" "$limit" --noconftest "$@"
  fi
}

trap finish EXIT
trap 'record interrupted failed "" 0 0 "the check was interrupted"; exit 1' INT TERM
printf '%s\n' env install probe >"$WORK/plan.txt"
say "gpu_check: repo $REPO, output $OUTDIR, scratch $WORK, deadline $((DEADLINE - START)) s"

# --- env: the interpreter (the first that imports jax), the GPU as the driver sees it.
PY=""
fallback=""
for cand in ${GPU_CHECK_PYTHON:-} python3 python; do
  path=$(command -v "$cand" 2>/dev/null) || continue
  [[ -z $fallback ]] && fallback=$path
  if timeout 120 "$path" -c "import jax" >/dev/null 2>&1; then
    PY=$path
    break
  fi
done
PY=${PY:-${fallback:-python3}}
env_info() {
  echo "python: $PY ($("$PY" --version 2>&1)); pip: $("$PY" -m pip --version 2>&1 | head -1)"
  echo "jax importable: $(timeout 120 "$PY" -c 'import jax; print(jax.__version__)' 2>&1 | tail -1)"
  uname -a
  echo "cpus: $(nproc 2>/dev/null)"
  if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1
    timeout 30 nvidia-smi --format=csv,noheader \
      --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
      >"$WORK/nvidia-smi-query.txt" 2>&1
    cat "$WORK/nvidia-smi-query.txt"
  else
    echo "nvidia-smi: not found"
  fi
}
export -f env_info
export PY WORK
run_step env 60 bash -c env_info

# --- install: missing or unsatisfying packages from the wheel folder into WORK/site.
run_step install 90 "$PY" "$HELPER" install --wheelhouse "$WHEELHOUSE" --site "$SITE" --out "$WORK/install.json"
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}

# --- probe: does JAX see a GPU? The CUDA backend alone first; else the CPU, for the versions.
GPU=0
if JAX_PLATFORMS=cuda run_step probe 120 "$PY" "$HELPER" probe --out "$WORK/probe.json" --site "$SITE"; then
  GPU=1
  export JAX_PLATFORMS=cuda,cpu # tests/conftest.py would otherwise pick the CPU
else
  mv "$WORK/probe.json" "$WORK/probe-cuda.json" 2>/dev/null
  export JAX_PLATFORMS=cpu
  timeout 120 "$PY" "$HELPER" probe --out "$WORK/probe.json" --site "$SITE" \
    --gpu-attempt "$WORK/probe-cuda.json" >>"$WORK/probe.log" 2>&1
  say "probe: no GPU visible to JAX; running the quick CPU versions of the phases"
fi

# --- GPU-only test classes, one pytest per file (a crash in one file loses only that file).
mapfile -t classes < <("$PY" "$HELPER" gpu-classes)
files=()
for c in "${classes[@]}"; do
  f=${c%%::*}
  [[ " ${files[*]} " == *" $f "* ]] || files+=("$f")
done
steps=()
for f in "${files[@]}"; do steps+=("gpu_tests:$(basename "$f" .py)"); done
steps+=(model_tests)
if ((GPU)); then steps+=(kernels:all_ops rollouts kernels:long_sequences); else steps+=(kernels:smoke); fi
printf '%s\n' "${steps[@]}" >>"$WORK/plan.txt"
say "GPU classes: ${classes[*]}"

tests_end=$(($(date +%s) + 150))
for f in "${files[@]}"; do
  ids=()
  for c in "${classes[@]}"; do [[ ${c%%::*} == "$f" ]] && ids+=("$c"); done
  pytest_step "gpu_tests:$(basename "$f" .py)" $((tests_end - $(date +%s))) "${ids[@]}"
done

# --- model-level Pallas tests: the tiny model's loss and gradients, and prefill + decode, with the
# Triton kernels against XLA (the 2x2x2-mesh test needs 8 devices; the TPU one libtpu).
if ((GPU)); then
  pytest_step model_tests 100 -k "pallas and not mesh and not tpu" tests/test_model_pallas.py \
    tests/test_generation.py
else
  record model_tests skipped "" 0 0 "no GPU: these run on the CPU in the test suite"
  report
fi

# --- kernels: every op at one length first (the roofline of each op), then the longer sequences.
KARGS=(--out "$WORK/kernels.jsonl")
read -r -a extra <<<"${GPU_CHECK_KERNELS_ARGS:-}"
if ((GPU)); then
  run_step kernels:all_ops 120 "$PY" benchmarks/kernels.py --seq_lens=4096 "${KARGS[@]}" "${extra[@]}"
  # RL rollout tokens/s at the issue's shapes (batch 64, prompt 64, 256 new tokens), against
  # PyTorch's generate when torch + transformers are importable here (they are not in the wheelhouse).
  impls=jax
  "$PY" -c "import torch, transformers" 2>/dev/null && impls=jax,torch
  run_step rollouts 150 "$PY" benchmarks/rollout_throughput.py --config=configs/small.py --impls=$impls
  run_step kernels:long_sequences 600 "$PY" benchmarks/kernels.py --ops=chunk_scan_fwd,chunk_scan_fwd_bwd \
    --seq_lens=8192,16384,32768 "${KARGS[@]}" "${extra[@]}"
else
  run_step kernels:smoke 120 "$PY" benchmarks/kernels.py --smoke --ops=state_update,moe_permute \
    "${KARGS[@]}" "${extra[@]}"
fi
exit 0 # the EXIT trap writes the final report and exits with its verdict
