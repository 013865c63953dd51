#!/usr/bin/env bash
# The training, encoding and zero-shot benches at GPU sizes: ViT-B/16, batch 256, bf16.
#
#   bash bench/gpu.sh [OUT_DIR]          # on a machine with one CUDA GPU; writes OUT_DIR/*.json
#
# - encoding, model only (pre-decoded tensors) and end to end (files decoded in 8 threads):
#   fp32 / bf16 autocast / bf16 weights / fp16 weights, images/s, ratios, min cosine to fp32, MFU
#   (model FLOPs per image x images/s over the measured bf16 / fp32 matmul peak of the GPU);
# - zero-shot: ZeroShotClassifier against transformers.pipeline at the same batch size, workers
#   and precision (bf16), also with the JPEGs decoded on the GPU (decode_on_device, nvJPEG; the
#   encoding bench times that path end to end too), after the per-image CPU preprocessing alone
#   (preprocess.py: the kit against torchvision v2 and transformers' image processors);
# - training: domainclip train (bf16 autocast, and train.bf16_weights: bf16 matrices with fp32
#   master weights) against open_clip_train, ViT-B-16, batch 256, bf16, with the training FLOPs
#   per sample and the GPU's bf16 matmul peak (MFU); then the 200-step RSICD loss curves of bf16
#   weights against autocast for full fine-tuning and LoRA (bf16_weights.py, batch 128, plot in OUT).
# The accuracy guard runs first (bf16 and fp16 against fp32 on the shared data), then again for bf16
# with zero-shot near ties refined in fp32, and the speed of that refinement (tie_refine.py).
# Every bench prints its JSON; a bench that found the machine busy (load average above half the
# cores at its start, or other processes' CPU above a tenth of the cores while a contender ran)
# writes nothing and exits 3. Needs the shared data in ../shared/data.
set -euo pipefail
cd "$(dirname "$0")"
OUT="${1:-gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  | tee -a "$OUT/gpu.txt"

status=0
# STEP_TIMEOUT=SECONDS bounds each bench (a lent machine's time is short); unset: no bound
run() {
  local bound=(); [ -n "${STEP_TIMEOUT:-}" ] && bound=(timeout "$STEP_TIMEOUT")
  echo "== $(date -u +%T) $*"
  "${bound[@]}" "$@" || { rc=$?; echo "exit $rc: $*"; status=$rc; }
}

export DOMAINCLIP_BENCH_SETTLE_S="${DOMAINCLIP_BENCH_SETTLE_S:-30}"  # a lent machine is quiet; never wait 5 min
run "$PY" precision_guard.py --device cuda --precisions bf16,fp16 --workers 8 --json "$OUT/precision_guard.json"
run "$PY" precision_guard.py --device cuda --precisions bf16 --refine-ties --workers 8 \
  --json "$OUT/precision_guard_refine_ties.json"
run "$PY" tie_refine.py --device cuda --batch-size 256 --workers 8 --rounds 2 --json "$OUT/tie_refine.json"
run "$PY" encode_throughput.py --device cuda --model ViT-B-16 --batch-size 256 --images 2048 --workers 8 \
  --rounds 3 --fp16 --decode-on-device --json "$OUT/encode_throughput.json"
run "$PY" preprocess.py --images 256 --rounds 3 --json "$OUT/preprocess.json"  # the host CPU that feeds the GPU
run "$PY" zeroshot_throughput.py --device cuda --precision bf16 --batch-size 256 --images 2048 --workers 8 \
  --rounds 2 --decode-on-device --json "$OUT/zeroshot_throughput.json"
run "$PY" train_throughput.py --device cuda --model ViT-B-16 --batch-size 256 --workers 8 --steps 10 \
  --warmup-steps 3 --rounds 2 --json "$OUT/train_throughput.json"
run "$PY" bf16_weights.py --steps 200 --batch 128 --workers 8 --plot "$OUT/bf16_weights_rsicd.png" \
  --json "$OUT/bf16_weights.json"
exit $status
