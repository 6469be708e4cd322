#!/usr/bin/env bash
# Run HERE (no GPU needed) before a GPU session: builds the fp16 variant, gathers what the GPU machine
# lacks (onnxruntime-gpu for Python 3.12, the exported model, the sentence-transformers folder, sample
# texts) and packs it into .gpu/pack/pNN folders of <= 56 MiB for the device tool (see gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
DATA=${DATA:-../shared/data}
rm -rf .gpu/stage && mkdir -p .gpu/stage/export .gpu/stage/st_model
export_dir=$(python3 -c "from embfast.export import ensure_exported, default_model_path as d; print(ensure_exported(d()))")
python3 -c "from embfast.variants import ensure_variant as e; import sys; e(sys.argv[1], 'fp16')" "$export_dir"
cp -r "$export_dir"/. .gpu/stage/export/
rm -f .gpu/stage/export/model.opt.onnx .gpu/stage/export/model.int8.onnx
st_dir=$(python3 -c "from embfast.export import default_model_path as d; print(d())")
cp -r "$st_dir"/. .gpu/stage/st_model/
shuf -n 20000 --random-source=<(yes) "$DATA/throughput/sentences.txt" > .gpu/stage/texts.txt
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d .gpu/stage onnxruntime-gpu==1.31.1
# small files travel in the tar; large ones through device-pack
tar -C .gpu/stage --exclude='*.onnx' --exclude='*.whl' --exclude='model.safetensors' -czf .gpu/stage/small.tgz .
../shared/tools/device-pack .gpu/pack .gpu/stage/*.whl .gpu/stage/export/model.onnx \
  .gpu/stage/export/model.fp16.onnx .gpu/stage/st_model/model.safetensors .gpu/stage/small.tgz
ls .gpu/pack
echo "Now: one device run per part (carry [.gpu/pack/pNN], command 'ls .gpu/pack'), back to back, then in the"
echo "last call: bash benchmarks/gpu_check.sh   (timeout_s 480)"
