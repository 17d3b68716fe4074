#!/usr/bin/env bash
# GPU smoke check and figures, for a CUDA machine that has torch and timm but not this package:
# trains the default recipe (bf16 autocast, channels_last), measures the hook overhead, and runs
# the torch.compile path. Writes figures to ${OUT:-/tmp/cycdata-gpu}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cycdata-gpu}
mkdir -p "$OUT"
# Lay the package out as it installs (cycdata.loaders -> loaders/ ...) without building it.
PKG=$(mktemp -d)
cp -r cycdata "$PKG/" && cp -r loaders train augment_ladder "$PKG/cycdata/"
export PYTHONPATH="$PKG:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
export PYTHONSAFEPATH=1  # `python -m` must not import ./cycdata (the core alone) from the checkout
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"

echo "== default recipe on the GPU"
TIMEFORMAT='wall seconds: %R'
time (python3 -m cycdata.train.cli train runtime.progress=false --out /tmp/gpu-default 2>&1 | tee "$OUT/default.log")
cp /tmp/gpu-default/metrics.csv "$OUT/default_metrics.csv"

echo "== hook overhead"
python3 benchmarks/hooks_overhead.py --repeats 12 --samples 4000 2>&1 | tee "$OUT/hooks_overhead.txt"
python3 benchmarks/hooks_overhead.py --repeats 6 --dataset synthetic:50000 --samples 50000 --batch-size 512 2>&1 \
    | tee -a "$OUT/hooks_overhead.txt"

echo "== torch.compile path"
python3 -m cycdata.train.cli train epochs=3 runtime.compile=true runtime.progress=false --out /tmp/gpu-compiled 2>&1 \
    | tee "$OUT/compile.log"

echo "== 224-px folder: images/s of the folder path against timm's loader, and a 224-px run through workers"
# Both loaders on the same written folder, same workers and batch size (CPU decoding; the GPU only trains).
python3 benchmarks/folder_loader.py --images 2048 --workers 8 --batch-size 128 --size 224 --epochs 3 2>&1 \
    | tee "$OUT/folder_loader.txt"
FOLDER=$(mktemp -d)
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from folder_loader import write_folder; write_folder(Path('$FOLDER'), 1280)"
time (python3 -m cycdata.train.cli train data.dataset=folder:$FOLDER data.image_size=224 model=resnet18 epochs=3 \
    data.placement=workers data.num_workers=8 data.batch_size=128 runtime.progress=false --out /tmp/gpu-folder224 \
    2>&1 | tee "$OUT/folder224.log")
