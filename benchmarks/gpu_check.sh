#!/usr/bin/env bash
# Run ON THE GPU MACHINE (device tool), after gpu_prepare.sh here and the part uploads:
# installs onnxruntime-gpu into a private folder, builds embfast for its Python, runs the GPU tests
# and benchmarks/bench_gpu.py; results land in $OUT (gpu.json, log.txt).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
C=$HOME/carried
bash .gpu/pack/p01/unpack.sh "$C" || { echo "a part is missing: carry the parts again"; exit 3; }
mkdir -p "$C/small" && tar -C "$C/small" -xzf "$C/small.tgz"
python3 -m pip install -q --no-index --no-deps --target "$HOME/site" "$C"/onnxruntime_gpu-*.whl
export PYTHONPATH=$HOME/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 4
# assemble the carried model folders
EXP=$HOME/export; ST=$HOME/st_model
mkdir -p "$EXP" "$ST"
cp -r "$C/small/export/." "$EXP/"; cp "$C/model.onnx" "$C/model.fp16.onnx" "$EXP/"
cp -r "$C/small/st_model/." "$ST/"; cp "$C/model.safetensors" "$ST/"
export EMBFAST_HOME=$HOME/embfast_home EMBFAST_REQUIRE_NATIVE=1
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/kernels -x 2>&1 | tail -5
python3 - "$EXP" <<'PY'
import sys, numpy as np, embfast
m = embfast.Embedder(sys.argv[1], device="cuda")
print("auto precision on cuda:", m.precision, m.device, m.session.provider)
c = embfast.Embedder(sys.argv[1], device="cpu")
t = ["The cat sat on the mat.", "GPU inference with ONNX Runtime", "Proteins fold."]
a, b = m.encode(t), c.encode(t)
print("cuda fp16 vs cpu fp32 min cosine:", float((a * b).sum(1).min()))
PY
PYTHONUNBUFFERED=1 timeout 300 python3 benchmarks/bench_gpu.py --export-dir "$EXP" --st-model "$ST" \
  --texts "$C/small/texts.txt" --out "$OUT/gpu.json"
