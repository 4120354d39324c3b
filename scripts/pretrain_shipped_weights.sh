#!/usr/bin/env bash
# How bundles/drasclr_lung_ct_ssl/models/model.pt was made, and how its linear probe was measured
# (2-core CPU, about 20 minutes of training). Run from the repository root; WORK defaults to /tmp/drasclr_work.
set -euo pipefail
WORK=${WORK:-/tmp/drasclr_work}
BUNDLE=bundles/drasclr_lung_ct_ssl

# 24 pretraining phantoms and 40 held-out probe phantoms (never seen in pretraining)
drasclr phantom --out "$WORK/ssl_phantoms" --n 24 --seed 1000
drasclr preprocess --datalist "$WORK/ssl_phantoms/datalist.json" --out "$WORK/ssl_pre"
drasclr phantom --out "$WORK/probe_phantoms" --n 40 --seed 5000
drasclr preprocess --datalist "$WORK/probe_phantoms/datalist.json" --out "$WORK/probe_pre"

# one epoch (405 steps of 32 patches with their 2 neighbours); queues of 16 keys per landmark for 24 subjects
python -m monai.bundle run --config_file "$BUNDLE/configs/train.json" --meta_file "$BUNDLE/configs/metadata.json" \
    --logging_file "$BUNDLE/configs/logging.conf" --bundle_root "$BUNDLE" --dataset_dir "$WORK/ssl_pre" \
    --ckpt_dir "$WORK/ssl_train/models" --output_dir "$WORK/ssl_train/eval" \
    --epochs 1 --batch_size 32 --queue_size 16 --num_workers 0
cp "$WORK/ssl_train/models/model.pt" "$BUNDLE/models/model.pt"
python scripts/write_large_files.py "$BUNDLE"

python scripts/linear_probe.py --preprocessed "$WORK/probe_pre" --phantoms "$WORK/probe_phantoms" \
    --weights "$BUNDLE/models/model.pt" --json "$WORK/linear_probe.json"
