#!/usr/bin/env bash
# Run launch.train on every worker of a Cloud TPU VM pod slice: one process per host.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra --config.* flags...]
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/edm_cifar10.py:cond /mnt/shared/runs/edm_cond \
#       --config.init.checkpoint=/mnt/shared/ckpt/edm-cifar10-cond
#
# Every worker runs the same command with DDO_JAX_DISTRIBUTED=1, so ddo_jax.parallel.maybe_initialize_distributed
# calls jax.distributed.initialize(), which finds the coordinator (worker 0), the process count and this
# worker's id through the TPU metadata server. This is the path `python -m launch.local_multiprocess`
# rehearses on one machine (there the coordinator, count and id come from JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES and JAX_PROCESS_ID instead). A worker that dies is noticed by the others at their next
# collective, or after DDO_JAX_HEARTBEAT_TIMEOUT seconds (default 100); they then exit instead of
# waiting, and rerunning this script resumes.
#
# The repository must be checked out at ~/ddo-jax on every worker
# (`gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command "git clone ... ~/ddo-jax"`)
# and WORKDIR must be a POSIX path every worker sees (a Filestore/NFS mount, or a bucket mounted with
# gcsfuse): the driver writes its JSON, PNG and negative-store files with plain file I/O, so gs:// URLs
# are not accepted as the workdir.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
EXTRA=$(printf ' %q' "$@")
HEARTBEAT=${DDO_JAX_HEARTBEAT_TIMEOUT:-100}
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -eo pipefail
  cd ~/ddo-jax
  pip install -q -e . 'jax[tpu]>=0.10.0,<0.11'
  export DDO_JAX_DISTRIBUTED=1 DDO_JAX_HEARTBEAT_TIMEOUT=$HEARTBEAT
  python3 -m launch.train --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")$EXTRA 2>&1 \
    | tee -a ~/ddo_train_\$(hostname).log
"
