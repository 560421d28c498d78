#!/usr/bin/env bash
# scripts/base_sweep.py on one GPU: the world data, the shipped VAE (its encoder is the recipe's VAE stage), the
# recipe's init, then six base trainings at once, time-boxed; $OUT receives sweep.json and the logs.
#   OUT=folder STEPS=4500 BUDGET_S=400 scripts/base_sweep_gpu.sh
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=${SWEEP_DIR:-/tmp/sweep}; OUT=${OUT:-$R/out}; mkdir -p "$OUT" "$R"
start=$(date +%s)
nvidia-smi -L
python3 -m sdxl.cli recipe --out "$R" --stages data --jobs 16 || exit 1
cp src/sdxl/assets/default_base.safetensors "$R/vae.safetensors"  # load_vae reads a full file's VAE
python3 -m sdxl.cli recipe --out "$R" --stages init || exit 1
echo "data, init: $(( $(date +%s) - start )) s"
python3 scripts/base_sweep.py --out "$R" --steps "${STEPS:-4500}" --deadline $(( start + ${BUDGET_S:-400} )) \
    --n 128 --fillers 16
cp "$R"/sweep.json "$OUT"/ 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$R" $(cd "$R" && ls sweep-*/log.jsonl sweep-*.json)
cat "$R"/sweep.json; echo "total: $(( $(date +%s) - start )) s"
