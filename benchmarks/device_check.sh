#!/usr/bin/env bash
# One run on a rented GPU machine (no network), from the repository root:
#
#     bash benchmarks/device_check.sh
#
# 1. install the wheels carried in .whl/ (bitsandbytes, peft; accelerate only if missing) and fxpeft itself
#    into $SITE; print versions and `nvidia-smi -L`. Carry a transformers wheel too (5.24, what CI tests with): the
#    machine's own transformers was 5.17 on 2026-11-30, which a session found too old for fxpeft's current code.
#    Fetch them with the pip download line of the device tool's README (Python 3.12, manylinux), into .whl/.
# 2. benchmarks/device_smoke.py: fxpeft on CUDA against peft (PASS/FAIL per check)
# 3. python -m benchmarks --device cuda --only train-a,inference (a GPU table for the README); BENCH_ONLY and
#    BENCH_REPS choose other comparisons and repetitions (BENCH_ONLY="mixed@10;fresh@1": two runs, each with its
#    own result files and repetitions), BENCH_CAP the stage's timeout, BENCH_ARGS more options (--eager-only), SKIP_SMOKE=1 leaves stage 2 out
#
# 4. SCRIPTS (optional, space-separated): standalone benchmark scripts run after stage 3, each as
#    `python3 -m benchmarks.<script> --device cuda --out $OUT/bench $SCRIPT_ARGS_<script>`, e.g.
#    SCRIPTS="mixed_training first_step" SCRIPT_ARGS_first_step="--layers 4 12" (SCRIPTS_CAP: the stage's timeout)
#
# Every stage runs under `timeout` within one budget for the whole script ($BUDGET seconds) and is logged to
# $OUT/device_check.log; a failed or timed-out stage does not stop the next. Files: $OUT/device_check.log and
# $OUT/bench/<date>-train-a-inference.{json,md,png} (written when the benchmark finishes).
# DEVICE=cpu is a dry run of the same steps here (the benchmark then runs --quick --threads 1).
set -u
cd "$(dirname "$0")/.."
REPO=$PWD SELF=$PWD/benchmarks/device_check.sh
export OUT=${OUT:-/tmp/device-check} SITE=${SITE:-/tmp/site} DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-450}  # seconds for all stages (each may overrun by a 10 s kill grace); the run allows 8 min
LOG=$OUT/device_check.log

install() {
    # pip must not see this repository or $SITE through PYTHONPATH while it installs into $SITE.
    local pip="env -u PYTHONPATH -u PYTHONSAFEPATH python3 -m pip install -q --no-deps --no-compile --no-cache-dir"
    rm -rf "$SITE" && mkdir -p "$SITE"
    if ls .whl/*.whl >/dev/null 2>&1; then
        if ! $pip --no-index --upgrade --target "$SITE" .whl/*.whl; then
            echo "WARNING: pip could not install .whl/*.whl: unpacking them into $SITE instead"
            for wheel in .whl/*.whl; do python3 -m zipfile -e "$wheel" "$SITE"; done
        fi
    else
        echo "WARNING: no .whl/*.whl (carry .whl): the machine's own peft/bitsandbytes, if any, are used"
    fi
    # pyproject maps passes/ to fxpeft.passes, so the sources are installed, not put on the path as they are
    # (built from a copy: the build leaves build/ and *.egg-info behind in its source folder).
    local src
    src=$(mktemp -d) && cp -r pyproject.toml README.md fxpeft passes "$src/"
    if ! $pip --no-build-isolation --target "$SITE" "$src"; then
        echo "WARNING: pip install . failed (setuptools>=77 missing?): copying the sources into $SITE"
        rm -rf "$SITE/fxpeft" && cp -r fxpeft "$SITE/fxpeft" && cp -r passes "$SITE/fxpeft/passes"
    fi
    rm -rf "$src"
    if ! python3 -c "import accelerate" 2>/dev/null && ls .whl/opt/accelerate-*.whl >/dev/null 2>&1; then
        echo "accelerate missing (transformers needs it to load bitsandbytes models): installing .whl/opt"
        $pip --no-index --target "$SITE" .whl/opt/accelerate-*.whl ||
            python3 -m zipfile -e .whl/opt/accelerate-*.whl "$SITE"
    fi
    python3 - <<'EOF'
import importlib
for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "fxpeft"):
    try:
        module = importlib.import_module(name)
        print(f"{name:13} {getattr(module, '__version__', '?'):24} {module.__file__}")
    except Exception as error:  # a broken native library raises more than ImportError
        print(f"{name:13} NOT IMPORTABLE: {error!r}"[:400])
import fxpeft.passes, torch
print("fxpeft.passes", fxpeft.passes.__file__)
print("torch cuda", torch.version.cuda, "available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
    nvidia-smi -L || echo "(no nvidia-smi)"
}

smoke() { python3 benchmarks/device_smoke.py --device "$DEVICE"; }

bench() {  # BENCH_ONLY: runs separated by ';', each "comparisons[@reps]", e.g. "mixed@10;fresh@1"
    if [ "$DEVICE" = cuda ]; then
        local run only reps
        IFS=';' read -ra runs <<< "${BENCH_ONLY:-train-a,inference}"
        for run in "${runs[@]}"; do
            only=${run%@*} reps=${BENCH_REPS:-20}
            [ "$only" != "$run" ] && reps=${run#*@}
            python3 -m benchmarks --device cuda --only "$only" --reps "$reps" --warmup 3 --out "$OUT/bench" \
                ${BENCH_ARGS:-}
        done
    else
        python3 -m benchmarks --device cpu --only train-a,inference --quick --threads 1 --out "$OUT/bench"
    fi
}

scripts() {  # SCRIPTS: see the header
    local script extra
    for script in ${SCRIPTS:-}; do
        extra="SCRIPT_ARGS_$script"
        python3 -m "benchmarks.$script" --device "$DEVICE" --out "$OUT/bench" ${!extra:-}
    done
}

if [ "${1:-}" = --stage ]; then  # the script calls itself for each stage, so that `timeout` can run it
    export PYTHONSAFEPATH=1 PYTHONPATH="$SITE:$REPO"  # not the cwd first: ./fxpeft lacks fxpeft.passes
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 MPLBACKEND=Agg
    "$2"
    exit $?
fi

mkdir -p "$OUT"
START=$SECONDS
stage() {  # stage NAME CAP: run stage NAME under a timeout of min(CAP, what is left of the budget)
    local name=$1 cap=$2 left=$((BUDGET - (SECONDS - START)))
    local limit=$((left < cap ? left : cap)) began=$SECONDS rc
    if [ "$limit" -lt 20 ]; then
        echo "=== $name: skipped, ${left} s of the budget left" | tee -a "$LOG"
        return
    fi
    echo "=== $name: timeout ${limit} s, $(date -u +%T) UTC" | tee -a "$LOG"
    timeout -k 10 "$limit" bash "$SELF" --stage "$name" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit ${rc}$([ "$rc" = 124 ] && echo ' (TIMED OUT)') after $((SECONDS - began)) s" | tee -a "$LOG"
}

commit="$(git rev-parse --short HEAD 2>/dev/null)$(git status --porcelain 2>/dev/null | grep -q . && echo ' (dirty)')"
echo "=== device_check: $(date -u +%FT%TZ), DEVICE=$DEVICE, budget ${BUDGET} s, git ${commit:-?}" | tee "$LOG"
stage install 90
[ -n "${SKIP_SMOKE:-}" ] || stage smoke 150
stage bench "${BENCH_CAP:-330}"
[ -z "${SCRIPTS:-}" ] || stage scripts "${SCRIPTS_CAP:-300}"
summary=$(
    echo "=== summary after $((SECONDS - START)) s"
    grep -E "^(PASS|FAIL|SKIP|SUMMARY) |^=== .*: exit|^wrote " "$LOG"
    find "$OUT" -type f -printf "%p %s bytes\n" 2>&1
)
echo "$summary" | tee -a "$LOG"
exit 0
