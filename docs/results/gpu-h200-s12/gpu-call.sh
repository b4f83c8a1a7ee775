#!/bin/bash
# The device call of session 12, as run (call 1; call 2 was the same with `train resnet44`
# removed, the stage holding plain-56's checkpoint at 46,200, and BUDGET 230).
# Sent with carry [".devgpu"]: .devgpu/ held this script, the deepres wrapper
# (exec python3 -c 'import sys; from deepres.cli import main; sys.exit(main())' "$@"),
# cifar10-jpeg-train.zip compressed with `xz -6` (16 MB instead of 52: the stored JPEGs share
# their headers), its sha256, commit.txt, and stage/NET with each CPU run's checkpoint,
# config.json, metrics.jsonl and preprocess.safetensors.
#!/bin/bash
# Session 12 device call: resume the CPU campaign's ResNet-44 (iteration 14,000) and plain-56
# (13,800) on the GPU, one after the other, CUDA graphs, bf16; SIGTERM (checkpoint) at DEADLINE.
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET:-550}))
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=$PWD/.devgpu:$PATH
left() { echo $((DEADLINE - $(date +%s))); }
log() { echo "$(( $(date +%s) - T0 ))s: $*" | tee -a $OUT/log.txt; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; nproc; lscpu | grep -i 'model name'; echo "commit $(cat .devgpu/commit.txt)"; } > $OUT/env.txt 2>&1
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.devgpu/cifar10-jpeg-train.zip.xz'), open('.devgpu/cifar10-jpeg-train.zip', 'wb'))"
got=$(sha256sum .devgpu/cifar10-jpeg-train.zip | cut -c1-64)
[ "$got" = "$(cat .devgpu/zip.sha256)" ] || { log "data sha256 mismatch $got"; exit 1; }
log "data ok"
mkdir -p runs-gpu reports-gpu && cp -r .devgpu/stage/* runs-gpu/
train() {
  deepres reproduce degradation --data .devgpu/cifar10-jpeg-train.zip --budget full --val-split 0 \
    --models $1 --runs runs-gpu --out reports-gpu/$1 --device cuda --quiet > runs-gpu/$1.log 2>&1 &
  pid=$!
  while [ $(left) -gt 0 ] && kill -0 $pid 2>/dev/null; do sleep 2; done
  kill -TERM $pid 2>/dev/null; wait $pid; rc=$?
  log "$1 rc=$rc; $(tail -c 300 runs-gpu/$1/metrics.jsonl | tail -1 | cut -c1-60)"
}
train resnet44
[ $(left) -gt 20 ] && train plain56
[ $(left) -gt 60 ] && train resnet110
for m in resnet44 plain56 resnet110; do
  [ -d runs-gpu/$m ] || continue
  skip=model.safetensors; [ -f runs-gpu/$m/summary.json ] && skip=checkpoint.safetensors
  tar cf $OUT/$m.tar --exclude=$skip runs-gpu/$m runs-gpu/$m.log reports-gpu/$m 2>/dev/null
done
log "done"; ls -la $OUT
