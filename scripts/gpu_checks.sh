#!/usr/bin/env bash
# The CUDA path's checks and benchmarks in one go (issue #9), for a lent GPU machine:
#   bash scripts/gpu_checks.sh OUT_DIR [quick|tests|bench]
# Needs torch with CUDA already installed; the codec libraries come from ./.whl when that
# folder exists (machines without a package index), else from pip. Logs and JSON land in OUT_DIR.
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR [quick|tests|bench]}
what=${2:-quick}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  python3 -m pip install -q --no-deps -e . && python3 -m pip install -q zstandard lz4 deflate isal || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'cores', len(__import__('os').sched_getaffinity(0)))"
ss="python3 -m shadowserve.cli"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s"; tail -n 25 "$out/$name.log"
}
if [ "$what" = quick ] || [ "$what" = tests ]; then
  step gpu-tests 240 python3 -m pytest -q -rs tests/gpu tests/dataplane/test_kv_targets.py -p no:cacheprovider
fi
if [ "$what" = quick ]; then
  step gpu-copy 90 $ss bench gpu_copy --chunks 16 --repeats 3 --json "$out/gpu-copy.json"
  step ttft-smoke 150 $ss bench ttft --model llama3-8b-shape --dtype bfloat16 --device cuda --kv-cache-memory 12GiB \
    --modes sync,offload --bandwidths 10 --prefix-tokens 4096 --batch 4 --json "$out/ttft-smoke.json"
fi
if [ "$what" = bench ]; then
  step gpu-copy 100 $ss bench gpu_copy --json "$out/gpu-copy.json"
  step ttft 220 $ss bench ttft --model llama3-8b-shape --dtype bfloat16 --device cuda --kv-cache-memory 16GiB \
    --modes sync,thread,offload,gpu --bandwidths 10 --prefix-tokens 16128 --batch 8 --dataplane-workers 3 \
    --json "$out/ttft.json"
  step interference 280 $ss bench interference --model llama3-8b-shape --dtype bfloat16 --device cuda \
    --kv-cache-memory 16GiB --modes offload,gpu,thread --batch 8 --decode-tokens 256 --prefix-tokens 8192 \
    --rounds 2 --dataplane-workers 3 --json "$out/interference.json"
fi
