#!/usr/bin/env bash
# Run ON THE GPU MACHINE (device tool), after gpu_prepare.sh here and the part uploads:
# installs onnxruntime-gpu into a private folder, builds embfast for its Python, runs the GPU tests
# and benchmarks/bench_gpu.py; results land in $OUT (gpu.json, log.txt, pytest.txt).
# Each step goes on when an earlier one fails, so one call brings back as much as it can.
# GPU_CHECK_TESTS_ONLY=1: the GPU tests alone (about 45 s after the parts are carried).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
C=$HOME/carried
step() { echo; echo "=== $* ($(date +%T))"; }
step unpack
bash .gpu/pack/p01/unpack.sh "$C" >/dev/null || { echo "a part is missing: carry the parts again"; exit 3; }
mkdir -p "$C/small" "$HOME/site" && tar -C "$C/small" -xzf "$C/small.tgz"
python3 -c "import lzma, tarfile, sys; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2])" \
  "$C/ort_gpu_site.tar.xz" "$HOME/site"
export PYTHONPATH=$HOME/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import onnxruntime as o; print(o.__file__, o.__version__, o.get_available_providers())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step build embfast
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
# assemble the carried model folders (model.onnx: the export's marker file; fp32 and fp16 are in the manifest)
EXP=$HOME/export; ST=$HOME/st_model
mkdir -p "$EXP" "$ST"
cp -r "$C/small/export/." "$EXP/"; cp "$C/model.opt.onnx" "$C/model.fp16.onnx" "$EXP/"
ln -sf model.opt.onnx "$EXP/model.onnx"
cp -r "$C/small/st_model/." "$ST/"; cp "$C/st_model.fp16.safetensors" "$ST/model.safetensors"
export EMBFAST_HOME=$HOME/embfast_home EMBFAST_REQUIRE_NATIVE=1 EMBFAST_GPU_TEST_MODEL=$EXP
cd /tmp  # import the installed package, not the source tree
R=$OLDPWD
step GPU tests
# the GPU-only tests (-k cuda: no tiny model here, it needs the bundled-model package), then the kernels
timeout 120 python3 -m pytest -q -p no:cacheprovider "$R/tests/test_gpu.py" -k cuda -rs 2>&1 | tee "$OUT/pytest.txt" | tail -8
[ "${GPU_CHECK_TESTS_ONLY:-0}" = 1 ] && { step done; exit 0; }
timeout 90 python3 -m pytest -q -p no:cacheprovider "$R/tests/kernels/test_kernels.py" 2>&1 | tee -a "$OUT/pytest.txt" | tail -3
step benchmark
timeout 330 python3 "$R/benchmarks/bench_gpu.py" --export-dir "$EXP" --st-model "$ST" \
  --texts "$C/small/texts.txt" --passages "$C/small/passages.txt" --out "$OUT/gpu.json"
step done
