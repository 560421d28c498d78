#!/usr/bin/env bash
# Train the four eval variants on a GPU around the shipped default model's VAE and text encoders (the recipe's
# variants stage, at once, time-boxed), then run experiments 2-3 of `sdxl eval` on them. Experiments 2-3 read only
# the variants' UNets and the base's VAE and text encoders, so the base UNet may still be training elsewhere.
#   OUT=folder BUDGET_S=250 scripts/variants_gpu.sh      (BUDGET_S: seconds from the start until the trainings stop)
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=${RECIPE_DIR:-/tmp/recipe}; OUT=${OUT:-$R/out}; mkdir -p "$OUT" "$R"
start=$(date +%s)
python3 -m sdxl.cli recipe ${SCALE:+--scale $SCALE} --out "$R" --stages data --jobs 16 || exit 1
python3 - "$R" <<'PY'
import sys
from sdxl.formats import checkpoint as ck
from sdxl.default_model import default_model_paths
from sdxl.models.model import ModelConfig, SDXLModel
base = ck.load(default_model_paths()["base"], components=("vae",))
vae = SDXLModel(ModelConfig(None, None, base.vae.cfg)); vae.vae.load_state_dict(base.vae.state_dict())
ck.save_single_file(vae.float(), f"{sys.argv[1]}/vae.safetensors")
PY
python3 -m sdxl.cli recipe ${SCALE:+--scale $SCALE} --out "$R" --stages init || exit 1
python3 - "$R" <<'PY'
import sys, torch
from sdxl.formats import checkpoint as ck
from sdxl.default_model import default_model_paths
a = ck.load(f"{sys.argv[1]}/init_variant.safetensors").conditioner.state_dict()
b = ck.load(default_model_paths()["base"]).conditioner.state_dict()
print("variant text encoders equal the shipped base's:", all(torch.equal(a[k].half(), b[k]) for k in a))
PY
echo "data, init: $(( $(date +%s) - start )) s"
python3 -m sdxl.cli recipe ${SCALE:+--scale $SCALE} --out "$R" --stages variants --jobs 4 --workers 3 \
    --deadline $(( start + ${BUDGET_S:-160} )) || { tail -20 "$R"/job-*.log; }
echo "trainings: $(( $(date +%s) - start )) s"
python3 -m sdxl.cli recipe --out "$R" --stages export-variants --variants-dir "$OUT/variants" && cat "$OUT/variants/variants.json"
python3 -c "import sys; from sdxl.cli import main; sys.exit(main(['eval', '--out', sys.argv[1], '--device', sys.argv[3], '--dtype', 'fp32', '--n', sys.argv[4], '--batch', '128', '-q', '--experiments', '2,3', '--variants', sys.argv[2]]))" "$OUT/eval" "$OUT/variants" "${DEVICE:-cuda}" "${N:-256}"
echo "total: $(( $(date +%s) - start )) s"
