#!/usr/bin/env bash
# GPU check of issue 11, on a fresh GPU machine, in under 8 minutes (its own timeout):
# installs the project, then runs scripts/device_check.py (ViT-B/16 224, random weights:
# fake-quant throughput of all / mixed_1 at batch 64 on CUDA vs CPU; CUDA-vs-CPU top-1
# agreement and max logit difference on 64 images). Writes ${OUT:-out}/device_check.json.
# Then `vitq analyze` on the embedded default model on CUDA and on CPU, compared:
# ${OUT:-out}/analyze_cuda_vs_cpu.json (and each run's log).
#
#   scripts/device_check.sh            # from the repository root
#
# Install: the existing .venv if it has a CUDA torch; else a python3 that imports torch
# (the project installed into it, --no-deps: the machine may be offline); else
# `make install TORCH_BUILD=cuda` (needs the package registries).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
deadline=$((SECONDS + ${DEVICE_CHECK_TIMEOUT_S:-470}))
left() { echo $((deadline - SECONDS)); }

nvidia-smi -L || { echo "device_check: no GPU (nvidia-smi -L failed)"; exit 3; }
has_cuda_torch() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if [ -x .venv/bin/python ] && has_cuda_torch .venv/bin/python; then
  PY=.venv/bin/python
elif has_cuda_torch "$(command -v python3)"; then
  PY=python3
  timeout "$(left)" $PY -m pip install -q --no-deps --no-build-isolation -e . || echo "device_check: editable install failed; running from the source tree"
  $PY -c 'import transformers, pandas, yaml, tqdm' || timeout "$(left)" $PY -m pip install -q transformers pandas pyyaml tqdm
else
  timeout "$(left)" make install TORCH_BUILD=cuda
  PY=.venv/bin/python
fi
$PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
timeout "$(left)" $PY scripts/device_check.py "$OUT/device_check.json"
echo "device_check: wrote $OUT/device_check.json in ${SECONDS} s"
# The whole pipeline on the GPU: `vitq analyze` on the embedded default model, on CUDA and on CPU
# (MAC cost: the latency table times ONNX Runtime on the CPU either way), then the two compared
# (skip-lists, accuracy tables, stage times) into $OUT/analyze_cuda_vs_cpu.json.
for dev in cuda cpu; do
  start=$SECONDS
  timeout "$(left)" $PY -m vitq analyze --device $dev --cost macs --out "${TMPDIR:-/tmp}/vitq-analyze-$dev" \
    --no-progress > "$OUT/analyze_$dev.log" 2>&1 || { echo "device_check: vitq analyze --device $dev failed"; tail -5 "$OUT/analyze_$dev.log"; exit 4; }
  echo "$((SECONDS - start))" > "${TMPDIR:-/tmp}/vitq-analyze-$dev/wall_s"
done
timeout "$(left)" $PY scripts/device_check.py --compare "${TMPDIR:-/tmp}/vitq-analyze-cuda" "${TMPDIR:-/tmp}/vitq-analyze-cpu" \
  "$OUT/analyze_cuda_vs_cpu.json"
echo "device_check: done in ${SECONDS} s"
