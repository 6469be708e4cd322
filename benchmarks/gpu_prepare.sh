#!/usr/bin/env bash
# Run HERE (no GPU needed) before a GPU session: builds the fp32 (fused) and fp16 variants, gathers
# what the GPU machine lacks (onnxruntime-gpu for Python 3.12, the exported model, the
# sentence-transformers folder, sample texts) and packs it into .gpu/pack/pNN folders of <= 56 MiB
# for the device tool (see gpu_check.sh). To keep the parts few (7):
#   - onnxruntime-gpu travels as an xz tarball of the wheel's files (203 MB instead of 256 MB),
#     minus the TensorRT provider, which embfast never asks for;
#   - the sentence-transformers weights travel in fp16: the baseline runs them in fp16 (.half())
#     anyway, and fp32 -> fp16 -> fp32 -> fp16 gives the same fp16 weights;
#   - the export travels as its two variants (model.opt.onnx = fp32, model.fp16.onnx), not model.onnx.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
DATA=${DATA:-../shared/data}
ORT_GPU=onnxruntime-gpu==1.31.1
rm -rf .gpu/stage .gpu/small && mkdir -p .gpu/stage .gpu/small/export .gpu/small/st_model
export_dir=$(python3 -c "from embfast.export import ensure_exported, default_model_path as d; print(ensure_exported(d()))")
python3 -c "from embfast.variants import ensure_variant as e; import sys; [e(sys.argv[1], p) for p in ('fp32', 'fp16')]" \
  "$export_dir"
cp -r "$export_dir"/. .gpu/small/export/
rm -f .gpu/small/export/*.onnx
st_dir=$(python3 -c "from embfast.export import default_model_path as d; print(d())")
cp -r "$st_dir"/. .gpu/small/st_model/
rm -f .gpu/small/st_model/model.safetensors .gpu/small/st_model/*.bin .gpu/small/st_model/onnx -r
python3 - "$st_dir/model.safetensors" .gpu/stage/st_model.fp16.safetensors <<'PY'
import sys
from safetensors.numpy import load_file, save_file
import numpy as np
t = load_file(sys.argv[1])
save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in t.items()}, sys.argv[2],
          metadata={"format": "pt"})
PY
shuf -n 20000 --random-source=<(yes) "$DATA/throughput/sentences.txt" > .gpu/small/texts.txt
python3 - "$DATA/scifact/corpus.jsonl" .gpu/small/passages.txt <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8")][:2000]
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for r in rows:
        f.write((r.get("title", "") + ". " + r["text"]).replace("\n", " ") + "\n")
PY
W=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$W" "$ORT_GPU"
(cd "$W" && unzip -q ./*.whl && rm -f ./*.whl onnxruntime/capi/libonnxruntime_providers_tensorrt.so \
   && tar -cf - onnxruntime onnxruntime_gpu-*.dist-info | xz -T0 -9 > "$OLDPWD/.gpu/stage/ort_gpu_site.tar.xz")
rm -rf "$W"
cp "$export_dir/model.opt.onnx" "$export_dir/model.fp16.onnx" .gpu/stage/
tar -C .gpu/small -czf .gpu/stage/small.tgz .
../shared/tools/device-pack .gpu/pack .gpu/stage/*
ls .gpu/pack
echo "Now: one device run per part (carry [.gpu/pack/pNN], command 'ls .gpu/pack'), back to back, then in the"
echo "last call: bash benchmarks/gpu_check.sh   (timeout_s 480)"
