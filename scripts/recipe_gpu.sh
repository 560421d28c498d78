#!/usr/bin/env bash
# `sdxl recipe` on one GPU, all trainings at once (a tiny UNet leaves a GPU mostly idle), time-boxed by a
# deadline. It made the first default model; the shipped one now comes from the recipe run on the 2-core CPU.
#   OUT=folder scripts/recipe_gpu.sh        (repo root; BUDGET_S: seconds from the start until trainings stop)
# $OUT receives the weights in pieces under 16 MiB (the base split into UNet and the rest) and logs.tgz.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=${RECIPE_DIR:-/tmp/recipe}; OUT=${OUT:-$R/out}; mkdir -p "$OUT" "$R"
start=$(date +%s)
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"
python3 -m sdxl.cli recipe ${SCALE:+--scale $SCALE} --out "$R" --stages data,vae,init --jobs 16 --workers 12 || exit 1
echo "data, vae, init: $(( $(date +%s) - start )) s"
python3 -m sdxl.cli recipe ${SCALE:+--scale $SCALE} --out "$R" --stages base,refiner,variants --jobs 7 --workers 2 \
    --deadline $(( start + ${BUDGET_S:-470} )) || { tail -20 "$R"/job-*.log; }
echo "trainings: $(( $(date +%s) - start )) s"
python3 -m sdxl.cli recipe ${SCALE:+--scale $SCALE} --out "$R" --stages export,export-variants --assets "$R/assets" --variants-dir "$R/variants"
python3 - "$R" "$OUT" <<'PY'
import sys
from safetensors.torch import load_file, save_file
r, out = sys.argv[1:]
sd = load_file(f"{r}/assets/default_base.safetensors")
save_file({k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}, f"{out}/base_unet.safetensors")
save_file({k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.")}, f"{out}/base_rest.safetensors")
PY
cp "$R/assets/default_refiner.safetensors" "$R"/variants/*.safetensors "$OUT"/
tar czf "$OUT/logs.tgz" -C "$R" assets/default_model.json variants/variants.json vae.json $(cd "$R" && ls job-*.log */log.jsonl)
ls -la "$OUT"; echo "total: $(( $(date +%s) - start )) s"
