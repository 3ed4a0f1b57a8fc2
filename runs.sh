#!/usr/bin/env bash
# Reproduce the PW-Self experiments on GPUs: pretraining (k-NN and linear probe are printed at its
# end), then a separate evaluation of the saved teacher (patchwise_tools.py --eval). Each dataset
# is run twice at the same budget: PW-Self, and plain DINO (no patch loss, per-view colour
# augmentation) as the baseline.
#
#   bash runs.sh --dry-run            # print the commands only
#   bash runs.sh cifar10 in100        # run some of them
#
# Set through the environment:
#   DATA_ROOT   holds cifar10/ and imagenet/{train,val}; ImageNet-100 is CMC's 100 classes of
#               imagenet/, read in place                                        (default: data)
#   OUT         where each run writes its checkpoint.pth and log.txt            (default: runs);
#               with NNODES above 1, on a filesystem every node sees: only global rank 0 writes
#               the checkpoint, and every rank goes on from it (a rank that sees another stops)
#   NGPUS       GPUs per node                                                   (default: 8)
#   NNODES      nodes; above 1 also set NODE_RANK and RDZV_ENDPOINT=host:port on every node
# Written for bash 4.2 too (CentOS 7), where "${a[@]}" of an empty array fails under set -u.
set -euo pipefail
cd "$(dirname "$0")"

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
DATA_ROOT=${DATA_ROOT:-data}
OUT=${OUT:-runs}
NGPUS=${NGPUS:-8}
NNODES=${NNODES:-1}
[ $# -gt 0 ] || set -- cifar10 in100 in1k

# torchrun's shared store hands a group it restarts (--max-restarts, a node back) the old group's
# addresses, and the restarted group hangs at its start (pytorch/pytorch#135712): give each its own.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
[ "$DRY_RUN" = 0 ] || echo "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"

if [ "$NNODES" -gt 1 ]; then
  LAUNCH="torchrun --nnodes=$NNODES --nproc_per_node=$NGPUS --node_rank=${NODE_RANK:?set NODE_RANK} --rdzv_backend=c10d --rdzv_endpoint=${RDZV_ENDPOINT:?set RDZV_ENDPOINT}"
else
  LAUNCH="torchrun --nproc_per_node=$NGPUS"
fi

run() {
  echo "$*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

for exp in "$@"; do
  case "$exp" in
    cifar10) data=(--data cifar10 --data_path "$DATA_ROOT/cifar10" --download) ;;
    in100)   data=(--data in100 --data_path "$DATA_ROOT/imagenet") ;;
    in1k)    data=(--data in1k --data_path "$DATA_ROOT/imagenet") ;;
    *) echo "runs.sh: unknown experiment '$exp'; choose from cifar10 in100 in1k" >&2; exit 2 ;;
  esac
  for method in pwself dino; do
    extra=(--photometric patch)
    [ "$method" = dino ] && extra=(--patch_loss_weight 0 --photometric view)
    out="$OUT/${exp}_$method"
    # Run again after a preemption, the script goes on from each run's last checkpoint.
    run $LAUNCH patchwise.py "${data[@]}" "${extra[@]}" --output_dir "$out"
    run $LAUNCH patchwise_tools.py --eval "${data[@]}" "${extra[@]}" --output_dir "$out"
  done
done
