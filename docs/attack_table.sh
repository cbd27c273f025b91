#!/usr/bin/env bash
# The README's attack table on the toy: erasing red and blue at the defaults, each attacked (attack.py at its
# defaults, but for its videos and targets at 20 sampling steps, as sample.py --eval toy samples) as erased, as
# the original model with a negative prompt, and as an eraser trained with --no-augment.
# Everything goes under one folder (default outputs/attack_table), which must not exist yet.
#     bash docs/attack_table.sh [FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/attack_table}
if [ -e "$out" ]; then echo "error: $out already exists; choose another folder" >&2; exit 2; fi
start=$(date +%s)
attack() { python attack.py --model toy --sample-steps 20 "$@"; }
for c in red blue; do
  python unlearn.py --model toy --concept "$c" --output-dir "$out/erasers/$c"
  python unlearn.py --model toy --concept "$c" --no-augment --output-dir "$out/erasers/${c}_no_augment"
  attack --eraser "$out/erasers/$c" --out "$out/$c/erased"
  attack --negative-prompt "$c" --concept "$c" --out "$out/$c/negative_prompt"
  attack --eraser "$out/erasers/${c}_no_augment" --out "$out/$c/no_augment"
done
python - "$out" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
sys.path.insert(0, ".")
from videos import Rate
out, seconds = sys.argv[1], int(sys.argv[2])
print("| concept | attacked | plain | continuous | discrete | discrete words |")
print("|---|---|---:|---:|---:|---|")
for c in ("red", "blue"):
    for run, name in (("erased", "eraser"), ("negative_prompt", "negative prompt"), ("no_augment", "eraser, --no-augment")):
        meta = json.load(open(f"{out}/{c}/{run}/attack.json"))
        r = {k: Rate(v["count"], v["of"]) for k, v in meta["rates"].items()}
        print(f"| {c} | {name} | {r['plain']} | {r['continuous']} | {r['discrete']} | {meta['discrete_phrase']} |")
print("\neach cell: videos showing the concept, k/n, the share and its 95 % Wilson interval over videos")
print(f"{seconds} s in all ({seconds // 60} min {seconds % 60} s)")
PY
