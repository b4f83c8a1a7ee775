#!/bin/bash
# Stage unfinished campaign runs for a device call (session 12's recipe), as session 17 ran it:
#   bash stage_gpu.sh plain110     (here, in the repo root; writes .devgpu/, which git ignores)
# then, by hand, .devgpu/call.sh (call.sh beside this file) and the device call:
#   command "CALL=588 BUDGET=480 bash .devgpu/call.sh", carry [".devgpu"], timeout_s 600.
set -e
cd /work/main
grep -q '^/.devgpu/$' .git/info/exclude || echo /.devgpu/ >> .git/info/exclude
mkdir -p .devgpu && rm -rf .devgpu/stage && mkdir .devgpu/stage
R=runs/reproduce-cifar10-jpeg-train-zip-full
[ -f .devgpu/cifar10-jpeg-train.zip.xz ] || xz -T2 -6 -k -c ../shared/data/cifar10-jpeg-train.zip > .devgpu/cifar10-jpeg-train.zip.xz
sha256sum ../shared/data/cifar10-jpeg-train.zip | cut -c1-64 > .devgpu/zip.sha256
git rev-parse HEAD > .devgpu/commit.txt
printf '#!/bin/bash\nexec python3 -c '"'"'import sys; from deepres.cli import main; sys.exit(main())'"'"' "$@"\n' > .devgpu/deepres; chmod +x .devgpu/deepres
for m in "$@"; do
  [ -f $R/$m/checkpoint.safetensors ] || { echo "no checkpoint for $m: it starts fresh there"; continue; }
  mkdir .devgpu/stage/$m; cp $R/$m/{checkpoint.safetensors,config.json,metrics.jsonl,preprocess.safetensors} .devgpu/stage/$m/
done
cat > .devgpu/gpu.sh <<'EOS'
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
EOS
du -sh .devgpu; ls .devgpu/stage
