#!/usr/bin/env bash
# GPU evidence in under 9 minutes on one GPU, offline (nothing is downloaded), for a CUDA machine that has
# torch, timm and cycdata's dependencies but not this package (laid out as it installs, as gpu_check.sh does):
#   (a) CIFAR-sized throughput: `cycdata train` on synthetic:50000 at 32 px, timm's resnet18, 2 epochs, batch
#       512, bf16 autocast; the constant recipe against the cyclical one (CWD + CST + CGC), images/second of
#       the last epoch from each run's metrics.csv, and their ratio;
#   (b) the default recipe (`cycdata train runtime.progress=false`), timed;
#   (c) the labels-500 suite at 3 seeds, one run at a time: the tuned protocol end to end on a GPU.
# Every step has a timeout inside one deadline (DEADLINE seconds, default 540); what each step wrote goes to
# ${OUT:-/tmp/cycdata-gpu-evidence} (metrics, logs, the suite's results; no checkpoints).
#
#   bash benchmarks/gpu_evidence.sh
#   STEPS=a MODEL=test_resnet N=100 BATCH=50 bash benchmarks/gpu_evidence.sh   # a CPU dry run of step (a)
#
# Knobs (environment): STEPS (default abc), MODEL (resnet18), N (synthetic images, 50000), EPOCHS (2),
# BATCH (512), DEADLINE (540), OUT, WORK (run folders; default a fresh temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cycdata-gpu-evidence}
STEPS=${STEPS:-abc}
MODEL=${MODEL:-resnet18}
N=${N:-50000}
EPOCHS=${EPOCHS:-2}
BATCH=${BATCH:-512}
DEADLINE=${DEADLINE:-540}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK"
# Lay the package out as it installs (cycdata.loaders -> loaders/ ...) without building it.
PKG=$(mktemp -d)
cp -r cycdata "$PKG/" && cp -r loaders train augment_ladder integrations "$PKG/cycdata/"
export PYTHONPATH="$PKG:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
export PYTHONSAFEPATH=1  # `python -m` must not import ./cycdata (the core alone) from the checkout
export HF_HUB_OFFLINE=1 TIMM_OFFLINE=1  # nothing is fetched (no pretrained weights are asked for anyway)
SECONDS=0
STATUS=0

# Seconds a step may take: its own cap, within what is left of the deadline (10 s kept for the last report).
left() {
    local cap=$1 rest=$((DEADLINE - SECONDS - 10))
    ((rest < cap)) && cap=$rest
    ((cap < 1)) && cap=1
    echo "$cap"
}

# Run a command under a timeout; report its status and wall seconds in the log and on stdout.
step() {
    local name=$1 cap=$2
    shift 2
    local began=$SECONDS
    timeout --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 5 "$OUT/$name.log"
    if ((rc == 124 || rc == 137)); then
        echo "$name: stopped by its ${cap}s timeout after $((SECONDS - began))s" | tee -a "$OUT/$name.log"
    else
        echo "$name: exit $rc, wall seconds $((SECONDS - began))" | tee -a "$OUT/$name.log"
    fi
    ((rc != 0)) && STATUS=1
    return $rc
}

{
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
    python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, \
'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

if [[ $STEPS == *a* ]]; then
    echo "== (a) throughput: synthetic:$N at 32 px, $MODEL, $EPOCHS epochs, batch $BATCH, amp"
    # The same data, model and (no) augmentation in both: the optimizer-side hooks are the only difference.
    # schedule_unit=step: the knobs move every step (over 2 epochs per-epoch knobs would stay at their easy end).
    COMMON=(data.dataset="synthetic:$N" data.image_size=32 model="$MODEL" epochs="$EPOCHS" data.batch_size="$BATCH"
            schedule_unit=step runtime.amp=true runtime.progress=false augment.ladder=none)
    step throughput-constant "$(left 150)" python3 -m cycdata.train.cli train "${COMMON[@]}" \
        optim.weight_decay=5.0e-4 temperature=null grad_clip=null --out "$WORK/constant"
    step throughput-cyclical "$(left 150)" python3 -m cycdata.train.cli train "${COMMON[@]}" \
        "optim.weight_decay={easy: 1.0e-5, hard: 5.0e-4}" "temperature={easy: 0.5, hard: 2.0}" \
        "grad_clip={easy: 0.5, hard: 2.0, mode: norm}" --out "$WORK/cyclical"
    for name in constant cyclical; do
        [[ -f $WORK/$name/metrics.csv ]] && cp "$WORK/$name/metrics.csv" "$OUT/throughput_${name}_metrics.csv"
    done
    python3 - "$OUT" <<'EOF' 2>&1 | tee "$OUT/throughput.txt"
import csv, sys
from pathlib import Path

out = Path(sys.argv[1])
speed = {}
for name in ("constant", "cyclical"):
    path = out / f"throughput_{name}_metrics.csv"
    if not path.is_file():
        print(f"{name}: no metrics.csv (the run failed or timed out; see {name}.log)")
        continue
    rows = list(csv.DictReader(path.open()))
    per_epoch = [float(row["images_per_second"]) for row in rows]
    seconds = [float(row["epoch_seconds"]) for row in rows]
    speed[name] = per_epoch[-1]  # the last epoch: the first one includes cuDNN autotuning and warm-up
    print(f"{name}: images/second per epoch {', '.join(format(v, '.0f') for v in per_epoch)}; "
          f"epoch seconds {', '.join(format(v, '.1f') for v in seconds)}")
if len(speed) == 2:
    print(f"cyclical / constant images/second (last epoch): {speed['cyclical'] / speed['constant']:.3f}")
EOF
fi

if [[ $STEPS == *b* ]]; then
    echo "== (b) the default recipe"
    step default "$(left 150)" python3 -m cycdata.train.cli train runtime.progress=false --out "$WORK/default"
    [[ -f $WORK/default/metrics.csv ]] && cp "$WORK/default/metrics.csv" "$OUT/default_metrics.csv"
fi

if [[ $STEPS == *c* ]]; then
    echo "== (c) the labels-500 suite, 3 seeds, one run at a time (resumable: the same command continues it)"
    step labels-500 "$(left 600)" python3 -m cycdata.train.cli experiment labels-500 --seeds 3 --jobs 1 \
        --out "$WORK/labels-500"
    grep -c '^\[' "$OUT/labels-500.log" | sed 's/^/runs finished: /'
    mkdir -p "$OUT/labels-500"
    for file in results.md results.json tuned.json accuracy.png knobs.png; do
        [[ -f $WORK/labels-500/$file ]] && cp "$WORK/labels-500/$file" "$OUT/labels-500/"
    done
fi

echo "== done in ${SECONDS}s (deadline ${DEADLINE}s); outputs in $OUT; run folders in $WORK"
exit $STATUS
