#!/usr/bin/env bash
# Run launch.train on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra --config.* flags...]
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/edm_cifar10.py:cond /mnt/shared/runs/edm_cond \
#       --config.init.checkpoint=/mnt/shared/ckpt/edm-cifar10-cond
#
# Every worker runs the same command; launch.train sees TPU_WORKER_HOSTNAMES and calls
# jax.distributed.initialize(). The repository must be checked out at ~/ddo-jax on every worker
# (`gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command "git clone ... ~/ddo-jax"`)
# and WORKDIR must be a POSIX path every worker sees (a Filestore/NFS mount, or a bucket mounted with
# gcsfuse): the driver writes its JSON, PNG and negative-store files with plain file I/O, so gs:// URLs
# are not accepted as the workdir. Rerunning resumes.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
EXTRA="$*"
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd ~/ddo-jax
  pip install -q -e . 'jax[tpu]>=0.10.0,<0.11'
  python3 -m launch.train --config $CONFIG --workdir $WORKDIR $EXTRA 2>&1 | tee -a ~/ddo_train_\$(hostname).log
"
