#!/usr/bin/env bash
# Builds the wheel folder that benchmarks/gpu_check.sh installs from on a GPU machine without network.
#
#   benchmarks/gpu_wheelhouse.sh [DIR]     download the pinned wheels below into DIR (default:
#                                          wheelhouse/ in the repository, which .gitignore ignores)
#   benchmarks/gpu_wheelhouse.sh --resolve print a freshly resolved pin list to paste into PINS
#
# Run it where pip reaches PyPI. The wheels are for the GPU machine, not this one: CPython
# $GPU_WHEELHOUSE_PYTHON (default 3.12), manylinux x86_64. Only what the project needs beyond jax
# is here: the project's dependencies, the test runner, and everything they need in turn.
# jax, jaxlib, the CUDA plugins and jax's own dependencies (EXCLUDED) come with the machine's jax
# and are never replaced; gpu_check.sh installs a wheel only when its package is missing there or
# its installed version does not satisfy the project.
#
# tests/test_gpu_check.py checks that PINS (with EXCLUDED and LAZY) covers every third-party import
# of turbos_jax, pallas_kernels, configs, benchmarks/kernels.py and the GPU test files.
set -euo pipefail

PY_VERSION=${GPU_WHEELHOUSE_PYTHON:-3.12}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Resolved once (--resolve) for CPython 3.12 from the project's requirements; jax 0.11 satisfies
# every jax requirement among them (flax 0.12.8: jax>=0.10; optax: >=0.5.3; orbax: >=0.6).
PINS=(
  absl-py==2.5.1
  aiofiles==25.1.0
  array_record==0.8.6
  cloudpickle==3.1.3
  etils==1.15.0
  flax==0.12.8
  fsspec==2026.9.0
  grain==0.2.18
  humanize==4.17.0
  hypothesis==6.170.17
  iniconfig==2.3.1
  markdown-it-py==4.3.0
  mdurl==0.1.2
  ml_collections==1.1.0
  msgpack==1.2.4
  optax==0.2.8
  orbax-checkpoint==0.12.8
  packaging==26.4
  pluggy==1.7.0
  portpicker==1.6.0
  prometheus_client==0.26.0
  protobuf==7.36.2
  psutil==7.2.2
  Pygments==2.21.0
  pytest==9.2.0
  PyYAML==6.0.4
  rich==15.0.0
  simplejson==4.3.0
  sortedcontainers==2.4.0
  tensorboardX==2.6.5
  tensorstore==0.1.86
  treescope==0.1.10
  typing_extensions==4.16.0
  uvloop==0.23.0
  zipp==4.1.2
)
# Installed with jax on any jax machine; never downloaded, never replaced.
EXCLUDED=(jax jaxlib numpy ml_dtypes opt_einsum scipy 'jax-cuda*' 'jax_cuda*' 'nvidia-*' libtpu)
# Imported only inside functions of the data pipeline (Parquet files, tokenizer files), never on the
# GPU check's path; large wheels (pyarrow alone is ~40 MiB), so not carried.
# shellcheck disable=SC2034  # read by tests/test_gpu_check.py
LAZY=(pyarrow sentencepiece tokenizers)
# What --resolve resolves: pyproject.toml's dependencies plus the test runner the check uses.
ROOTS=(pytest hypothesis)

PLATFORM_ARGS=(
  --only-binary=:all: --python-version "$PY_VERSION" --implementation cp
  --abi "cp${PY_VERSION/./}"
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64
)

excluded() {
  local name pat
  name=$(echo "$1" | tr 'A-Z_.' 'a-z--')
  for pat in "${EXCLUDED[@]}"; do
    pat=$(echo "$pat" | tr 'A-Z_.' 'a-z--')
    # shellcheck disable=SC2254  # the patterns are globs on purpose
    case $name in $pat) return 0 ;; esac
  done
  return 1
}

if [[ ${1:-} == --resolve ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mapfile -t deps < <(python3 -c '
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' "$REPO/pyproject.toml")
  python3 -m pip install --quiet --dry-run --ignore-installed --report "$tmp/report.json" \
    "${PLATFORM_ARGS[@]}" --target "$tmp/target" "${deps[@]}" "${ROOTS[@]}"
  python3 -c '
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(item["metadata"]["name"] + "==" + item["metadata"]["version"])' "$tmp/report.json" | sort -f |
    while read -r pin; do excluded "${pin%%==*}" || echo "  $pin"; done
  exit 0
fi
if [[ ${1:-} == -* ]]; then
  sed -n '2,/^set /p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit 2
fi

DIR=${1:-$REPO/wheelhouse}
mkdir -p "$DIR"
python3 -m pip download --quiet --no-deps "${PLATFORM_ARGS[@]}" -d "$DIR" "${PINS[@]}"

# Keep one wheel per pinned package: remove wheels of other versions left by an earlier build.
python3 - "$DIR" "${PINS[@]}" <<'EOF'
import os, re, sys

folder, pins = sys.argv[1], sys.argv[2:]
canon = lambda name: re.sub(r"[-_.]+", "-", name).lower()
want = {canon(p.split("==")[0]): p.split("==")[1] for p in pins}
found = {}
for f in sorted(os.listdir(folder)):
    if not f.endswith(".whl"):
        continue
    name, version = f.split("-")[:2]
    if want.get(canon(name)) != version:
        print(f"removing {f} (not pinned)")
        os.remove(os.path.join(folder, f))
    else:
        found[canon(name)] = f
missing = sorted(set(want) - set(found))
if missing:
    sys.exit(f"no wheel for {missing}")
EOF
echo "$(find "$DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR (CPython $PY_VERSION)"
