#!/bin/bash
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET:-550}))
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PATH=$PWD/.devgpu:$PATH
left() { echo $((DEADLINE - $(date +%s))); }
log() { echo "$(( $(date +%s) - T0 ))s: $*" | tee -a $OUT/log.txt; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; nproc; lscpu | grep -i 'model name'; echo "commit $(cat .devgpu/commit.txt)"; } > $OUT/env.txt 2>&1
[ -f .devgpu/cifar10-jpeg-train.zip ] || python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.devgpu/cifar10-jpeg-train.zip.xz'), open('.devgpu/cifar10-jpeg-train.zip', 'wb'))"
[ "$(sha256sum .devgpu/cifar10-jpeg-train.zip | cut -c1-64)" = "$(cat .devgpu/zip.sha256)" ] || { log "data sha256 mismatch"; exit 1; }
mkdir -p runs-gpu reports-gpu && cp -r .devgpu/stage/* runs-gpu/ 2>/dev/null
for m in $NETS; do
  [ $(left) -gt 30 ] || break
  deepres reproduce degradation --data .devgpu/cifar10-jpeg-train.zip --budget full --val-split 0 \
    --models $m --runs runs-gpu --out reports-gpu/$m --device cuda --quiet > runs-gpu/$m.log 2>&1 &
  pid=$!
  while [ $(left) -gt 0 ] && kill -0 $pid 2>/dev/null; do sleep 2; done
  kill -TERM $pid 2>/dev/null; wait $pid; log "$m rc=$?; $(tail -n 1 runs-gpu/$m/metrics.jsonl | cut -c1-60)"
done
for m in $NETS; do
  [ -d runs-gpu/$m ] || continue
  skip=model.safetensors; [ -f runs-gpu/$m/summary.json ] && skip=checkpoint.safetensors
  tar cf $OUT/$m.tar --exclude=$skip runs-gpu/$m runs-gpu/$m.log reports-gpu/$m 2>/dev/null
done
log done
