#!/usr/bin/env bash
# The GPU check in one command, from the repository root of a bare CUDA machine (docs/gpu/README.md):
#
#   bash tests/gpu/run.sh [OUT_DIR]     # OUT_DIR: else $OUT, else ./gpu-results
#
# Needs .gpu-kit/ (`make gpu-kit` on a machine with a package index, carried along). Installs the kit's
# wheels into $GPU_SITE (default /tmp/site) with no index, puts it and the repository on PYTHONPATH
# (scope_mega is not installed), then runs, each part capped by `timeout` so that the whole stays within
# 8 minutes on an H100: the environment probe (versions, GPU, driver, every module imported, pinned
# host<->device copy bandwidth), pytest over tests/gpu and every test file elsewhere that asks for
# CUDA, and tools/bench_train_step.py on the 1B preset (MFU, tokens/s). Without CUDA (the rehearsal,
# CUDA_VISIBLE_DEVICES=) the CUDA tests skip and the bench runs its tiny CPU preset instead.
# Writes OUT_DIR/results.json and OUT_DIR/summary.md (tests/gpu/results_to_json.py), next to env.json,
# junit.xml, parts.tsv (each part's exit code and seconds) and run.log (the parts' output): six files,
# under the eight a device call brings back. Exits non-zero when a part failed or timed out.
set -uo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mkdir -p "${1:-${OUT:-./gpu-results}}" && cd "${1:-${OUT:-./gpu-results}}" && pwd)
py=${PYTHON:-python3}
site=${GPU_SITE:-/tmp/site}
cd "$repo" || exit 1
status=0
note() { printf '[%s] %s\n' "$(date +%T)" "$*"; }
part() {  # part NAME SECONDS CMD...: CMD under a time cap, its output also to OUT/run.log; its exit
    local name=$1 limit=$2 rc start=$SECONDS  # code and seconds to OUT/parts.tsv
    shift 2
    note "== $name: $* (at most ${limit}s)" | tee -a "$out/run.log"
    timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$out/run.log"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$out/parts.tsv"
    [ "$rc" -eq 0 ] || { note "$name: exit code $rc$([ "$rc" -eq 124 ] && echo ' (timed out)')"; status=1; }
}

shopt -s nullglob
wheels=(.gpu-kit/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels in .gpu-kit/: run \`make gpu-kit\` where pip reaches a package index, then carry .gpu-kit" >&2
    exit 2
fi
note "installing ${#wheels[@]} wheels into $site"
rm -rf "$site"
"$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}" || exit 2
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled  # no index or hub is reachable there

for f in env.json junit.xml parts.tsv run.log results.json summary.md; do rm -f "$out/$f"; done
part probe 60 "$py" tests/gpu/probe_env.py "$out/env.json"
cuda=$("$py" -c 'import json, sys; print(int(json.load(open(sys.argv[1]))["cuda"]))' "$out/env.json" 2>/dev/null)

# tests/gpu, and the test files elsewhere that mark a test `gpu` or branch on CUDA
mapfile -t elsewhere < <(grep -rlE --include='test_*.py' 'mark\.gpu|cuda\.is_available\(\)' tests |
    grep -v '^tests/gpu/' | sort)
part pytest 260 "$py" -m pytest -q -rfEs -p no:cacheprovider --timeout=150 -o junit_logging=system-out \
    --junitxml="$out/junit.xml" tests/gpu "${elsewhere[@]}"

if [ "${cuda:-0}" = 1 ]; then
    bench=(--preset llama-1b --device cuda --packing both --steps 3)
else
    bench=(--preset demo --device cpu --steps 1)
fi
part bench 110 "$py" tools/bench_train_step.py "${bench[@]}"

"$py" tests/gpu/results_to_json.py "$out" || status=1
note "wrote $out/results.json and $out/summary.md"
exit $status
