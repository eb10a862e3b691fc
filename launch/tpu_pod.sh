#!/usr/bin/env bash
# Runs the rlhf-jax binary on every worker of a Cloud TPU VM pod slice, one process per worker.
#
#   launch/tpu_pod.sh TPU_NAME ZONE BINARY_FLAGS...
#   e.g. launch/tpu_pod.sh my-v4-32 us-central2-b --phase=sft \
#          --config=configs/sft.py:gpt_neo_1p3b --workdir=/mnt/shared/runs/neo
#
# It is `gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all --command="cd REPO &&
# python3 -m rlhf_jax.main FLAGS"`: every worker starts the same command, and JAX finds the slice's
# workers, this worker's index and the coordinator by itself (`jax.distributed.initialize()` on a
# Cloud TPU VM), so no multi-host flag is needed. The mesh spans all chips of the slice.
#
# Environment:
#   REPO_DIR  the repository on the workers (default: ~/rlhf-jax)
#   PROJECT   gcloud --project (default: gcloud's configured project)
#   SYNC=1    first copy this checkout to REPO_DIR on every worker (gcloud ... scp --worker=all)
#   SETUP     a command run on every worker before the binary, e.g. 'pip install -e .'
# The workdir (and any checkpoint or data path) must be on storage that every worker sees (NFS or a
# gcsfuse mount): Orbax writes each worker's shards of a checkpoint from that worker.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
shift 2
REPO_DIR=${REPO_DIR:-'~/rlhf-jax'}
GCLOUD=(gcloud compute tpus tpu-vm)
TARGET=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all)

if [[ "${SYNC:-0}" == 1 ]]; then
  "${GCLOUD[@]}" ssh "$TPU_NAME" "${TARGET[@]}" --command="mkdir -p $REPO_DIR"
  "${GCLOUD[@]}" scp --recurse "$(cd "$(dirname "$0")/.." && pwd)/." "$TPU_NAME:$REPO_DIR" \
    "${TARGET[@]}"
fi
ARGS=$(printf '%q ' "$@")  # Quoted for the remote shell.
COMMAND="cd $REPO_DIR && ${SETUP:+$SETUP && }python3 -m rlhf_jax.main $ARGS"
echo "on every worker of $TPU_NAME: $COMMAND" >&2
exec "${GCLOUD[@]}" ssh "$TPU_NAME" "${TARGET[@]}" --command="$COMMAND"
