#!/usr/bin/env bash
# Everything a session with a GPU runs, in one command of under 10 minutes (the device tool's limit; the
# machine is given back 30 s after a call, so each call must stand alone):
#   tests  the Triton kernels' tests natively (not the interpreter);
#   quick  `bnlab bench --gpu --quick` (batch 256, bf16 + fp32, forward+backward, with the acceptance check);
#          QUICK_KNOBS="TILE=8192 ..." sets the Triton kernels' knobs for it (recorded in the CSV);
#   candidates  bnlab's rows of the quick bench only, once per knob setting in CANDIDATES (';' between
#          settings, e.g. "TILE_BYTES=16384;TILE=8192 TILE_BYTES=16384"), each against this call's quick CSV
#          at the defaults (run `quick` first; else QUICK_AGAINST's): the whole sums of each candidate, on
#          the same machine, in candidates.log (CSVs in candidates.tgz); CANDIDATE_S each (default 100);
#   tune   the knob sweep (benchmarks/tune_triton.py), bf16;
#   full   `bnlab bench --gpu` (every batch, dtype and direction);
#   profile every kernel's GPU time on a few shapes (benchmarks/profile_kernels.py, PROFILE_SET: large,
#          small, nchw, cl or several, "small nchw cl"), PROFILE_DTYPE (default bfloat16; float32), the
#          kernels compiled in $JOBS processes first;
#   host   where a small layer's host time goes (benchmarks/host_gpu.py), ~10-20 s, then compiled layers
#          (default and reduce-overhead: four inductor compiles, ~1 min);
#   network a whole torchvision ResNet-50 training step (bf16 autocast) with torch's BN layers, bnlab's
#          native ones and the Triton kernels, both layouts (benchmarks/network_step.py; NETWORK_ARGS, e.g.
#          "--profile --graphs --kernels", NETWORK_S, default 240; ~35 s without them in run 23, the
#          kernels' first compiles in its warm-up);
#   variants ghost BN (ghosts read in place) and batch renorm (statistics from the kernel) beside the paths
#          they ran before session 20 and a plain BN layer (benchmarks/variants_step.py; VARIANTS_ARGS,
#          VARIANTS_S, default 120; untimed so far);
#   inductor the kernels torch.compile generates for one BN training step (benchmarks/inductor_code.py,
#          INDUCTOR_SHAPE, default 256,256,14,14 NCHW bf16), ~20-40 s;
#   ncu    Nsight Compute's counters on one shape's reductions (benchmarks/ncu_step.py), NCU_S (default 90);
#   caches pack the compile caches (Triton's, inductor's) into $OUT/caches.tar.xz.part* (15 MB each, two
#          of the 8 files that come back): copied to .gpucache/ (git-ignored) and carried in the next call
#          (carry [".gpucache"]), they are restored first and spare its compiles.
# Results land in $OUT (the device tool brings that folder back: at most 8 files) or /tmp/bnlab-gpu.
# Usage, from the repository root, on the GPU machine (python3 there has torch and triton):
#   bash benchmarks/gpu_session.sh [tests|quick|candidates|tune|full|profile|host|network|variants|inductor|ncu|caches]...
#   (default: tests quick tune)
# Step time limits can be set in the environment: TESTS_S, QUICK_S (its timing budget is
# QUICK_S minus 100 s of compiling and reporting), TUNE_S, FULL_S, PROFILE_S, HOST_S, INDUCTOR_S.
set -uo pipefail
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/bnlab-cache/triton TORCHINDUCTOR_CACHE_DIR=/tmp/bnlab-cache/inductor
OUT="${OUT:-/tmp/bnlab-gpu}"
LAST_CSV=benchmarks/results/h200-2026-11-28/gpu-nvidia-h200-20261128-171038.csv  # (run 23: the last H200 run at the defaults)
# (session 27: channels-last reductions in 16-warp programs of 4x the tiles, one an SM, then the same with their
# loads deeper through shared memory: profile_kernels.py's WIDE_ROWS and WIDE_DEEP; knobs of a setting apart by
# spaces, no spaces within a value)
WIDE_ROWS="REDUCTION_ROWS_TILE_SCALE=4 REDUCTION_WARPS={'planes':4,'rows':16} PROGRAMS_PER_SM={'planes':2,'rows':1} SMALL_PROGRAMS_PER_SM={'planes':4,'rows':1}"
DEEP="STATS_PREFETCH={'planes':False,'rows':False} STATS_STAGES={'planes':3,'rows':4}"
DEFAULT_CANDIDATES="$WIDE_ROWS;$WIDE_ROWS $DEEP"
JOBS=$(nproc)
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests quick tune)

if ls .gpucache/caches.tar.xz.part* >/dev/null 2>&1; then
  cat .gpucache/caches.tar.xz.part* | tar -C / -xJ && echo "restored compile caches from .gpucache"
fi
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,temperature.gpu --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true  # (stale there in session 7: the tree's digest below is not)
  echo "source $(find src benchmarks tests -name '*.py' -o -name '*.sh' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
  echo "cpus $JOBS"
  for tool in ncu nsys; do echo "$tool: $(command -v $tool || echo none)"; done  # (hardware counters: NOTES' open question)
} | tee "$OUT/machine.txt"

for step in "${steps[@]}"; do
  echo "=== $step ($(date -u +%T))"
  case "$step" in
    tests)
      # Not the CPU-only checks (ahead-of-time compile, machine-code reading): CI does them.
      # -v: each result on its own line as it comes (xdist names failures only at the end, which a step
      # cut short by its limit never reaches: session 5's runs lost the name of one failing test so)
      timeout "${TESTS_S:-100}" python3 -m pytest -v -p no:cacheprovider -n "$JOBS" --durations=5 \
        tests/test_triton.py tests/test_func_transforms.py tests/test_gpubench.py tests/test_launch.py \
        tests/test_benchmarks.py::test_a_network_step_replayed_from_a_cuda_graph_trains_as_eager_steps_do \
        -k "not compiles_for_nvidia and not instruction_budget and not flags_slow_loops" 2>&1 \
        | tee "$OUT/tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -15 ;;
    quick)
      # (the warm-up compiles every group's kernels in $JOBS processes first: ~70 groups of torch.compile
      #  and Triton compiles would otherwise spend most of the budget one after another)
      # (QUICK_AGAINST: an earlier run's CSV to compare bnlab's rows and sums with, printed last; default
      #  the last H200 run committed, "" for none)
      # (QUICK_KNOBS: the Triton kernels' knobs for this run, space-separated NAME=VALUE, e.g.
      #  "TILE=8192 TILE_BYTES=16384": a candidate's whole sums, recorded in the CSV's knobs column)
      q=${QUICK_S:-300}
      against=${QUICK_AGAINST-$LAST_CSV}
      knobs=()
      for knob in ${QUICK_KNOBS:-}; do knobs+=(--knob "$knob"); done
      timeout "$q" python3 -m bnlab.cli bench --gpu --quick --out "$OUT" --budget-s $((q - 100)) \
        --warm-jobs "$JOBS" ${against:+--against "$against"} ${knobs[@]+"${knobs[@]}"} 2>&1 | tee -a "$OUT/bench-quick.log" \
        | tail -45 ;;
    candidates)
      base=$(ls "$OUT"/gpu-*.csv 2>/dev/null | head -1)
      base=${base:-${QUICK_AGAINST-$LAST_CSV}}
      c=${CANDIDATE_S:-100}
      IFS=';' read -ra settings <<< "${CANDIDATES:-$DEFAULT_CANDIDATES}"  # (a literal default would end at its first })
      for setting in "${settings[@]}"; do
        knobs=()
        for knob in $setting; do knobs+=(--knob "$knob"); done
        echo "--- candidate: $setting (against $base)" | tee -a "$OUT/candidates.log"
        timeout "$c" python3 -m bnlab.cli bench --gpu --quick --providers bnlab-triton --out /tmp/bnlab-candidates \
          --budget-s $((c - 40)) --warm-jobs "$JOBS" --against "$base" ${knobs[@]+"${knobs[@]}"} 2>&1 \
          | tee -a "$OUT/candidates.log" | grep -E "^  sum |rows skipped|rror" | grep -v "called from Python" \
          | tail -10  # (the sums as graphs time them here; candidates.log has them called from Python too)
      done
      tar -C /tmp -czf "$OUT/candidates.tgz" bnlab-candidates 2>/dev/null ;;
    tune)
      timeout "${TUNE_S:-180}" python3 benchmarks/tune_triton.py --out "$OUT/tune.csv" --warm-jobs "$JOBS" 2>&1 \
        | tee "$OUT/tune.log" | grep -E "BEST|copy|rror" ;;
    full)
      f=${FULL_S:-560}
      timeout "$f" python3 -m bnlab.cli bench --gpu --out "$OUT" --budget-s $((f - 200)) --warm-jobs "$JOBS" 2>&1 \
        | tee "$OUT/bench-full.log" | tail -80 ;;
    profile)
      for set in ${PROFILE_SET:-large}; do  # one or more sets, each within PROFILE_S, into one log ($OUT's 8 files)
        timeout "${PROFILE_S:-60}" python3 benchmarks/profile_kernels.py --set "$set" --warm-jobs "$JOBS" \
          --dtype "${PROFILE_DTYPE:-bfloat16}" 2>&1 \
          | tee -a "$OUT/profile.log" | tail -40
      done ;;
    host)
      # (HOST_ARGS: e.g. "--no-compile --profile-chain": cProfile of 53 split-plan layers in a row, session 25)
      timeout "${HOST_S:-120}" python3 benchmarks/host_gpu.py ${HOST_ARGS:-} 2>&1 | tee "$OUT/host.log" | tail -50 ;;
    network)
      # (NETWORK_ARGS: e.g. "--model resnet50 --batch 128 --layouts channels_last")
      timeout "${NETWORK_S:-240}" python3 benchmarks/network_step.py --out "$OUT" ${NETWORK_ARGS:-} 2>&1 \
        | tee "$OUT/network.log" | tail -10 ;;
    variants)
      # (VARIANTS_ARGS: e.g. "--shapes 256x256x56x56 --layouts nchw"; the rows' kernels compile in it, ~30 s)
      timeout "${VARIANTS_S:-120}" python3 benchmarks/variants_step.py --out "$OUT" ${VARIANTS_ARGS:-} 2>&1 \
        | tee "$OUT/variants.log" | tail -26 ;;
    inductor)
      timeout "${INDUCTOR_S:-60}" python3 benchmarks/inductor_code.py --shape "${INDUCTOR_SHAPE:-256,256,14,14}" 2>&1 \
        | tee "$OUT/inductor.log" | tail -5 ;;
    caches)  # in parts of 15 MB: the device tool brings back files of at most 16 MiB (session 7's was 24 MB)
      XZ_OPT="-T0 -6" tar -C / -cJ tmp/bnlab-cache 2>/dev/null | split -b 15M - "$OUT/caches.tar.xz.part"
      ls -l "$OUT"/caches.tar.xz.part* ;;
    ncu)
      # Nsight Compute's counters on one shape's reductions (benchmarks/ncu_step.py; NCU_SHAPE, NCU_LAYOUT,
      # NCU_KERNELS: a regex of kernel names, two a step; the second step's, after the first compiled. Anchored:
      # session 14's unanchored "_grad_kernel" also matched _input_grad_kernel, so it read step 1's dx)
      timeout "${NCU_S:-90}" ncu --kernel-name "regex:${NCU_KERNELS:-^(_stats_kernel|_grad_kernel)\$}" --launch-skip 2 \
        --launch-count 2 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats \
        python3 benchmarks/ncu_step.py --shape "${NCU_SHAPE:-256,256,14,14}" --layout "${NCU_LAYOUT:-NCHW}" 2>&1 \
        | tee -a "$OUT/ncu.log" | grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|rror" ;;
    *) echo "unknown step $step (tests, quick, candidates, tune, full, profile, host, network, variants, inductor, caches, ncu)"
       exit 2 ;;
  esac
done
echo "=== done ($(date -u +%T)); files in $OUT"
