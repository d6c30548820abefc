#!/usr/bin/env bash
# One short, prepared session on a lent GPU machine (benchmarks/README.md, "GPU and TPU").
#
#   bash benchmarks/gpu_session.sh [PHASE ...]     (default: every phase, in this order)
#
# Phases: env, apitests (started in the background, on CPU cores 8-15 with JAX_PLATFORMS=cpu:
# tests/test_jax_api.py and the not-slow model, attention, loss and train tests on this
# machine's jax), throughput (the gpt2-124m preset against the PyTorch reference, and both
# steps' time by part of the model: benchmarks/parts.py), attention (benchmarks/attention.py:
# each attention kernel of one layer beside PyTorch's SDPA), checks
# (benchmarks/device_checks.py; bgchecks starts it in the background instead: numerics only, so
# it may share the GPU), growth (benchmarks/growth.py --preset gpt2-124m), knobs
# (benchmarks/knobs.py with a profile of each variant; KNOBS overrides its --variants), xlaflags
# (knobs.py's default variant once per XLA flag set: XLAFLAGS, sets separated by ";"), scale
# (configs/scale.py: the site-packages corpus prepared unless it is there, then SCALE_SEEDS (3)
# seeds side by side, each seed's runs in order, for at most SCALE_SECS (420; it took 392 s on
# an H100) seconds; the run dirs without their checkpoints go to $OUT/scale.tgz, to be analysed
# with `launch.py --analyze_only`; SCALE_CONFIG (configs/scale.py) and SCALE_FLAGS (added to
# every launcher) rehearse it on a CPU).
# Everything goes to $OUT (default runs/gpu): one log, the JSON results and the traces as one
# tarball. Meant for an image that has jax with CUDA, flax, optax, orbax and torch: wheels in
# .whl/ (ml-collections, grain, array-record: bash benchmarks/gpu_wheels.sh) are installed to
# /tmp/site first. DEADLINE (seconds, default 540) bounds the whole run: the last phases get
# what is left. EXTRA is added to every benchmark's flags (EXTRA=--quick rehearses the session
# on a CPU in a minute).
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
LOG="$OUT/session.log"
START=$(date +%s)
DEADLINE=${DEADLINE:-540}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
PHASES=${*:-env apitests throughput attention checks growth knobs}
BENCH_CPUS=${BENCH_CPUS:-0-7}   # the benchmarks' cores; the background tests take TEST_CPUS
TEST_CPUS=${TEST_CPUS:-8-15}

say() { echo "$*" | tee -a "$LOG"; }
# benchmarks/device_checks.py as both `checks` (in turn) and `bgchecks` (in the background) run it.
# shellcheck disable=SC2206
CHECKS_CMD=(taskset -c "$BENCH_CPUS" python3 benchmarks/device_checks.py
            --out "$OUT/device_checks.json" --watchdog 30 ${EXTRA:-})
# scale_sweep: one launcher per seed, side by side; each trains its seed's runs in dependency
# order (the names come from the launcher's own dry run, so the config alone decides them).
scale_sweep() {
  local cfg=$1 dir=$2 seeds=$3; shift 3
  local names k only pids=()
  names=$(python3 experiments/launch.py --config="$cfg" --seeds="$seeds" --sweep_dir="$dir" \
    --dry_run "$@" | grep -o -- '--config.name=[^ ]*' | cut -d= -f2) || return 1
  for (( k = 0; k < seeds; k++ )); do
    only=$(echo "$names" | grep -- "-s$k\$" | paste -sd, -)
    python3 experiments/launch.py --config="$cfg" --seeds="$seeds" --sweep_dir="$dir" \
      --only="$only" --noanalyze "$@" > "$OUT/scale-s$k.log" 2>&1 &
    pids+=($!)
  done
  local rc=0 p
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for (( k = 0; k < seeds; k++ )); do echo "-- seed $k:"; tail -n 4 "$OUT/scale-s$k.log"; done
  return $rc
}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
# phase NAME SECONDS CMD...: runs CMD with at most SECONDS (and never past the deadline).
phase() {
  local name=$1 secs=$2; shift 2
  local rest; rest=$(left)
  (( secs > rest )) && secs=$rest
  if (( secs < 20 )); then say "== $name skipped: ${rest}s left"; return; fi
  say "== $name (limit ${secs}s) at +$(( $(date +%s) - START ))s"
  local t0; t0=$(date +%s)
  timeout "$secs" "$@" 2>&1 | grep -v "^WARNING: All log messages before absl" | tee -a "$LOG"
  say "== $name rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 ))s"
}

for p in $PHASES; do
  case $p in
    env)
      phase env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
        --format=csv; python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch, \
        ml_collections; print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", \
        optax.__version__, \"orbax\", o.__version__, \"torch\", torch.__version__); \
        print(jax.devices())"' ;;
    apitests)
      say "== apitests: background, log in $OUT/apitests.log"
      (JAX_PLATFORMS=cpu timeout 420 taskset -c "$TEST_CPUS" python3 -m pytest -q -p no:cacheprovider \
        -n 6 -m "not slow" tests/test_jax_api.py tests/test_model.py tests/test_attention.py \
        tests/test_loss.py tests/test_train.py > "$OUT/apitests.log" 2>&1;
       echo "apitests rc=$?" >> "$OUT/apitests.log") &
      APITESTS=$! ;;
    throughput)
      phase throughput 240 taskset -c "$BENCH_CPUS" python3 benchmarks/throughput.py --preset gpt2-124m \
        --profile /tmp/throughput_prof --out "$OUT/throughput.json" ${THROUGHPUT_FLAGS:-} \
        ${EXTRA:-} ;;
    attention)
      phase attention 90 taskset -c "$BENCH_CPUS" python3 benchmarks/attention.py \
        --preset gpt2-124m --out "$OUT/attention.json" ${EXTRA:-} ;;
    bgchecks)
      say "== checks: background, log in $OUT/checks.log"
      (timeout 240 "${CHECKS_CMD[@]}" > "$OUT/checks.log" 2>&1;
       echo "checks rc=$?" >> "$OUT/checks.log") &
      CHECKS=$! ;;
    scale)
      SCALE_DIR=${SCALE_DIR:-runs/scale}
      [[ -f runs/data/site-packages/manifest.json ]] || phase prepare 90 python3 -m growlm.prepare \
        --source=site-packages --tokenizer=bytes --out=runs/data/site-packages --progress=false
      export -f scale_sweep; export OUT
      phase scale "${SCALE_SECS:-420}" bash -c 'scale_sweep "$@"' scale_sweep \
        "${SCALE_CONFIG:-configs/scale.py}" \
        "$SCALE_DIR" "${SCALE_SEEDS:-3}" ${SCALE_FLAGS:-}
      # One file: the device tool brings back only so many files from $OUT.
      tar czf "$OUT/scale.tgz" -C "$SCALE_DIR" --exclude=checkpoints . ;;
    checks)
      phase checks 240 "${CHECKS_CMD[@]}" ;;
    growth)
      phase growth 90 taskset -c "$BENCH_CPUS" python3 benchmarks/growth.py --preset gpt2-124m \
        --out "$OUT/growth.json" ${EXTRA:-} ;;
    knobs)
      phase knobs 600 taskset -c "$BENCH_CPUS" python3 benchmarks/knobs.py --preset gpt2-124m \
        --profile /tmp/knobs_prof --out "$OUT/knobs.json" ${EXTRA:-} \
        --variants "${KNOBS:-default; logits_dtype=float32; kernel_forward=rerun; scan_unroll=1; \
remat=full; param_dtype=bfloat16; batch=32}"
      tar czf "$OUT/knobs_traces.tgz" -C /tmp knobs_prof 2>/dev/null ;;
    xlaflags)
      # One process per XLA flag set (XLA reads XLA_FLAGS once, at start): the default variant of
      # knobs.py under each, added to any XLA_FLAGS already set; an unknown flag fails its set.
      IFS=';' read -ra FLAGSETS <<< "${XLAFLAGS:-; --xla_gpu_enable_cudnn_layer_norm=true; \
--xla_gpu_enable_while_loop_double_buffering=true; --xla_gpu_enable_command_buffer=}"
      for k in "${!FLAGSETS[@]}"; do
        f=$(echo "${FLAGSETS[$k]}" | xargs)
        XLA_FLAGS=$(echo "${XLA_FLAGS:-} $f" | xargs) phase "xlaflags $k [${f:-none}]" 120 \
          taskset -c "$BENCH_CPUS" python3 benchmarks/knobs.py --preset gpt2-124m \
          --variants default --out "$OUT/xlaflags_$k.json" ${EXTRA:-}
      done ;;
    *) say "unknown phase $p" ;;
  esac
done
if [[ -n "${CHECKS:-}" ]]; then
  say "== waiting for checks"
  wait "$CHECKS"
  tail -n 40 "$OUT/checks.log" | tee -a "$LOG"
fi
if [[ -n "${APITESTS:-}" ]]; then
  say "== waiting for apitests"
  wait "$APITESTS"
  tail -n 30 "$OUT/apitests.log" | tee -a "$LOG"
fi
say "== session done in $(( $(date +%s) - START ))s"
