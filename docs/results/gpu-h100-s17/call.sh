#!/bin/bash
# Session 17's one device call: finish plain-110 (BUDGET s), then the CUDA tests with what is left.
T0=$(date +%s)
NETS=plain110 BUDGET=${BUDGET:-460} bash .devgpu/gpu.sh
cp runs-gpu/plain110/metrics.jsonl $OUT/plain110-metrics.jsonl 2>/dev/null
left=$(( ${CALL:-585} - ($(date +%s) - T0) ))
echo "tests get ${left}s" | tee -a $OUT/log.txt
[ $left -gt 20 ] && PYTHONPATH=$PWD timeout $left python3 -m pytest -p no:cacheprovider -q -rs tests/test_cuda.py 2>&1 | tee $OUT/test_cuda.txt | tail -n 30
echo "call done $(( $(date +%s) - T0 ))s" | tee -a $OUT/log.txt
