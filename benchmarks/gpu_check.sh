#!/usr/bin/env bash
# The GPU check, in one call on one GPU, done in under 8 minutes: each part has its own time limit (they sum to
# 7.6 minutes; not yet timed on an H100), and no part runs past BUDGET seconds from the start (460 s; a part
# that would start with under 5 s of it left is reported as not run):
#
#   1. every test marked `cuda` (what `make test-gpu` runs)
#   2. one GRPO step of a Qwen2.5-0.5B-shaped random model in bf16: rlpost with its native engine, then
#      with vLLM, then TRL's GRPOTrainer at equal work (benchmarks/gpu_step.py): tokens/s, MFU, peak
#      memory per role next to `rlpost plan memory`'s figure, and the TRL / rlpost step-time ratio
#   3. packing on CUDA: a tiny `rlpost train` with trainer.packing=true (skipped, saying so, where this
#      rlpost has no trainer.packing)
#   4. fsdp2 on one GPU with NCCL: a tiny `rlpost train trainer.strategy=fsdp2` under torchrun
#   5. the vLLM engine's options (gpu_step.py's vllm_features part), one engine over a LoRA policy: sleep
#      mode (GPU memory in use before the engine, awake, asleep, after each RL step: printed), top-p (samples
#      in the nucleus, the behaviour log-probs, RL steps at ratio 1) and LoRA (greedy through the LoRARequest
#      vs the policy's own forward, adapter-only syncs); skipped without vLLM
#
#   bash benchmarks/gpu_check.sh                  # PY=path/to/python to pick the interpreter (default .venv)
#   GPU_CHECK_DIR=results bash benchmarks/gpu_check.sh   # where logs and gpu_step.json go (default $OUT or a temp dir)
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh    # every command on the CPU at toy size (gloo for fsdp2):
#                                                        # checks the script itself, measures nothing (a slow test)
#   GPU_CHECK_BUDGET_S=300 bash benchmarks/gpu_check.sh  # a tighter budget for the whole check (default 460 s)
#
# A part that fails is reported and the next one still runs; the exit status is 1 if any part failed,
# 2 when torch sees no GPU (nothing is run then).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DIR=${GPU_CHECK_DIR:-${OUT:-$(mktemp -d)}}
mkdir -p "$DIR"
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEVICE=${GPU_CHECK_DEVICE:-cuda}
TINY_RUN=(sft.steps=20 sft.batch_size=16 rl.steps=3 rl.eval_every=0 rollout.prompts_per_step=4 rollout.k=4
          task.num_eval=20 eval.samples_per_prompt=1 model.n_layer=2 model.n_embd=32 model.n_head=2
          "model.device=$DEVICE" "out_dir=$DIR/runs")
START=$(date +%s)
FAILED=()
BUDGET=${GPU_CHECK_BUDGET_S:-460}

# the parts' limits sum to 455 s on a GPU, inside the 460 s budget that also covers the device check; with the 10 s a
# killed part may take and the bookkeeping after it (a python check of a few seconds) the whole stays under 480 s;
# on the CPU (toy sizes, a loaded machine) limits and budget are 3x as long
SCALE=1
part() {  # part NAME SECONDS COMMAND...: run it with a time limit, its output to the console and DIR/NAME.log
    local name=$1 limit=$(( $2 * SCALE )) t0=$(date +%s) rc left
    shift 2
    left=$(( BUDGET * SCALE - (t0 - START) ))
    if [ "$left" -lt 5 ]; then
        echo "=== $name: NOT RUN: the check's budget of $(( BUDGET * SCALE )) s is spent"
        FAILED+=("$name(not run)")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit} s)"
    # -k 10: a part that ignores the TERM at its limit is killed 10 s later (the budget's margin)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$DIR/$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        echo "=== $name: ok in $(( $(date +%s) - t0 )) s"
    else
        echo "=== $name: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit')) after $(( $(date +%s) - t0 )) s"
        FAILED+=("$name")
    fi
}

echo "=== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "(no nvidia-smi)"
if [ "$DEVICE" = cpu ]; then
    echo "gpu_check: GPU_CHECK_DEVICE=cpu: the commands at toy size on the CPU, to check this script; no GPU numbers"
    STEP_ARGS=(--device cpu --tiny --steps 1)
    SCALE=3
elif ! "$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'CUDA',
torch.version.cuda, torch.cuda.get_device_name() if ok else 'no GPU visible'); sys.exit(0 if ok else 2)"; then
    echo "gpu_check: torch ($PY) sees no GPU: nothing to check here (benchmarks/gpu_step.py --device cpu --tiny" \
         "runs the step's code path on the CPU)"
    exit 2
else
    STEP_ARGS=()
fi

part cuda_tests 75 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider

part grpo_step 210 "$PY" benchmarks/gpu_step.py ${STEP_ARGS[@]+"${STEP_ARGS[@]}"} --skip vllm_features \
    --json "$DIR/gpu_step.json"

if "$PY" -c "import dataclasses, sys; from rlpost.config import TrainerConfig
sys.exit(0 if 'packing' in {f.name for f in dataclasses.fields(TrainerConfig)} else 1)" 2>/dev/null; then
    part packing 35 "$PY" -m rlpost.cli train "${TINY_RUN[@]}" trainer.packing=true run_name=packing
else
    echo "=== packing: skipped: this rlpost has no trainer.packing key (rlpost/config.py TrainerConfig)"
fi

# NCCL_DEBUG=INFO: the log then shows that NCCL, not gloo, carried the collectives
NCCL_DEBUG=INFO part fsdp2_nccl 45 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    -m rlpost.cli train "${TINY_RUN[@]}" trainer.strategy=fsdp2 rl.weight_sync=copy run_name=fsdp2
if [ "$DEVICE" != cpu ] && [ -f "$DIR/fsdp2_nccl.log" ]; then
    if grep -q "NCCL INFO" "$DIR/fsdp2_nccl.log"; then
        echo "=== fsdp2_nccl: NCCL ran the collectives ($(grep -c 'NCCL INFO' "$DIR/fsdp2_nccl.log") NCCL INFO lines)"
    else  # one rank may never need a communicator: say so rather than claim NCCL ran
        echo "=== fsdp2_nccl: NCCL not confirmed: no 'NCCL INFO' line in the log (one rank created no communicator)"
    fi
fi

part vllm_features 90 "$PY" benchmarks/gpu_step.py ${STEP_ARGS[@]+"${STEP_ARGS[@]}"} --skip native vllm trl \
    --json "$DIR/vllm_features.json"

echo "=== gpu_check: $(( $(date +%s) - START )) s in all; logs and gpu_step.json in $DIR"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "=== gpu_check: FAILED: ${FAILED[*]}"
    exit 1
fi
echo "=== gpu_check: every part ran"
