#!/bin/bash
# Device call 3 (session 15): plain-110 resumed from call 1's checkpoint (iteration 14,012), staged
# again in .devgpu/stage/plain110; SIGTERM (checkpoint) after 200 s. Call 2 had tried to reuse the
# device's own runs-gpu/ from call 1, but only part of that folder was still there (no config.json,
# no metrics.jsonl), so deepres refused it (exit 2) and nothing trained.
T0=$(date +%s); export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PATH=$PWD/.devgpu:$PATH
[ -f .devgpu/cifar10-jpeg-train.zip ] || python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.devgpu/cifar10-jpeg-train.zip.xz'), open('.devgpu/cifar10-jpeg-train.zip', 'wb'))"
rm -rf runs-gpu; mkdir -p runs-gpu; cp -r .devgpu/stage/plain110 runs-gpu/
deepres reproduce degradation --data .devgpu/cifar10-jpeg-train.zip --budget full --val-split 0 \
  --models plain110 --runs runs-gpu --out reports-gpu/plain110 --device cuda --quiet > runs-gpu/plain110-b.log 2>&1 &
pid=$!
while [ $(( $(date +%s) - T0 )) -lt 200 ] && kill -0 $pid 2>/dev/null; do sleep 2; done
kill -TERM $pid; wait $pid; echo rc=$?
tar cf $OUT/plain110.tar --exclude=model.safetensors runs-gpu/plain110 runs-gpu/plain110-b.log
