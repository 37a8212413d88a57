#!/usr/bin/env bash
# The README's real-data figures on CASME II (5-class, 2014 sheet, Cropped or raw release), rerun from
# DATA_ROOT at the machine's recipe (SIZE=auto: the CPU recipe on a machine without a GPU). Skips with
# one line when the data are absent. Runs go to runs/ (ablation/, real_*/), figures to the console.
#
#   DATA_ROOT=/data/CASME2 bash bench/real_casme2.sh                 # everything (6-8 h on 2 cores)
#   DATA_ROOT=/data/CASME2 STEPS=timing bash bench/real_casme2.sh    # one step: timing, table, final
#
# timing  `make loso MODEL=ststnet` and `make loso MODEL=famnet` each from a cold cache, alone on the
#         machine: the README's wall times (preprocessing included)
# table   the "Real-data results (CASME II)" table: make ablation ABLATION=experiments/ablation_real.yaml,
#         3 seeds for STSTNet and FAMNet fused / 2D only / 3D only / without the AU task, seed 0 for the
#         other rows; JOBS=2 fold processes of one thread each
# final   make train-final MODEL=famnet, then famnet-pl predict on one clip's frame folder and on the
#         same clip written as an mp4
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${DATA_ROOT:-}" || ! -d "${DATA_ROOT:-}" ]]; then
  echo "bench/real_casme2.sh: skipped: no CASME II at DATA_ROOT='${DATA_ROOT:-}' (set DATA_ROOT to a CASME II" \
       "root; ../shared/tools/casme2_frames/README.md rebuilds one)"
  exit 0
fi
STEPS=${STEPS:-timing,table,final}
JOBS=${JOBS:-2}
OUT=bench/out/real_casme2
# The rebuilt public copy misses frames of 5 clips: they are dropped and listed (241 of 246 remain).
COMMON=(DATASET=casme2 "DATA_ROOT=$DATA_ROOT" "JOBS=$JOBS" WANDB=off)
DROP="--data.missing_frames=drop"
mkdir -p "$OUT"

step() { [[ ",$STEPS," == *",$1,"* ]]; }

if step timing; then
  for model in ststnet famnet; do
    rm -rf "$OUT/cache_$model" "runs/real_timing_$model"
    start=$SECONDS
    make -s loso "${COMMON[@]}" MODEL=$model EXP=real_timing_$model \
      ARGS="$DROP --data.cache_dir=$OUT/cache_$model" | tail -n 12
    echo "timing: make loso DATASET=casme2 MODEL=$model JOBS=$JOBS from a cold cache: $((SECONDS - start)) s"
  done
fi

if step table; then
  make -s ablation "${COMMON[@]}" ABLATION=experiments/ablation_real.yaml SEEDS=0,1,2 \
    VARIANTS=ststnet,famnet_fused,famnet_2d_only,famnet_3d_only,famnet_no_au ARGS="$DROP"
  make -s ablation "${COMMON[@]}" ABLATION=experiments/ablation_real.yaml SEEDS=0 \
    VARIANTS=resnet18_apex,famnet_no_attention,famnet_paper,frl_dgt_paper,frl_dgt ARGS="$DROP"
fi

if step final; then
  make -s train-final "${COMMON[@]}" MODEL=famnet EXP=real_final ARGS="$DROP"
  model_dir=$(ls -d runs/real_final/casme2/final)
  clip=$(find "$DATA_ROOT" -type d -path '*sub01/EP02_01f' | head -n 1)
  # onset 46, apex 59, offset 86 (the coding sheet's row for sub01/EP02_01f)
  .venv/bin/famnet-pl predict "$model_dir" --frames "$clip" --onset 46 --apex 59 --offset 86 \
    --out "$OUT/predict_frames.json"
  .venv/bin/python - "$clip" "$OUT/EP02_01f.mp4" <<'EOF'
import sys
from pathlib import Path

import cv2

clip, out = Path(sys.argv[1]), sys.argv[2]
frames = sorted(clip.glob("*.jpg"), key=lambda p: int("".join(c for c in p.stem if c.isdigit())))
first = cv2.imread(str(frames[0]))
writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), 200, first.shape[1::-1])
for path in frames:
    writer.write(cv2.imread(str(path)))
writer.release()
print(f"{out}: {len(frames)} frames, first frame number {frames[0].stem}")
EOF
  first=$(ls "$clip" | sed 's/[^0-9]//g' | sort -n | head -n 1)
  .venv/bin/famnet-pl predict "$model_dir" --video "$OUT/EP02_01f.mp4" --first-frame "$first" \
    --onset 46 --apex 59 --offset 86 --out "$OUT/predict_mp4.json"
  cat "$OUT/predict_frames.json" "$OUT/predict_mp4.json"
fi
