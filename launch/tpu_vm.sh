#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: one `fdiff train` process per worker, which
# find each other by themselves (jax.distributed auto-detection).
#
#   launch/tpu_vm.sh create                 create the TPU VM, or reuse it if it exists
#   launch/tpu_vm.sh install                copy this checkout to every worker, pip install it
#   launch/tpu_vm.sh train CONFIG [--config.a.b=v ...]
#                                           start (or resume) training on every worker
#   launch/tpu_vm.sh logs                   follow worker 0's log
#   launch/tpu_vm.sh stop                   SIGTERM on every worker: checkpoint at an agreed step, exit
#   launch/tpu_vm.sh delete                 delete the TPU VM
#
# Environment: TPU_NAME, ZONE (required); ACCELERATOR_TYPE (default v4-32);
# RUNTIME_VERSION (default tpu-ubuntu2204-base); SPOT=1 for a spot slice;
# for train: WORKDIR (required; gs://bucket/run or a path every worker shares),
# DATA_DIR (TFDS data_dir, e.g. gs://bucket/tensorflow_datasets), MANUAL_DIR
# (CelebA files, for data.dataset=celeba). See launch/README.md.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
remote_dir=fdiff-jax
pid_file=fdiff_train.pid
log_file=fdiff_train.log

on_workers() {  # Runs a shell command on every worker.
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

create() {
  if gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" > /dev/null 2>&1; then
    echo "reusing TPU VM $TPU_NAME" >&2
    return
  fi
  local spot=()
  if [[ ${SPOT:-0} == 1 ]]; then spot=(--spot); fi
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "${ACCELERATOR_TYPE:-v4-32}" \
    --version "${RUNTIME_VERSION:-tpu-ubuntu2204-base}" "${spot[@]}"
}

install() {
  local archive
  archive=$(mktemp --suffix .tar.gz)
  tar -czf "$archive" -C "$(dirname "$0")/.." --exclude .git --exclude '*.egg-info' .
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:fdiff-jax.tar.gz" --zone "$ZONE" --worker=all
  rm -f "$archive"
  on_workers "rm -rf $remote_dir && mkdir $remote_dir && tar -xzf fdiff-jax.tar.gz -C $remote_dir \
    && pip install -q -U 'jax[tpu]' && pip install -q -e ./$remote_dir"
}

train() {
  local config=${1:?usage: $0 train CONFIG [--config.a.b=v ...]}
  shift
  : "${WORKDIR:?set WORKDIR (gs://bucket/run or a shared path)}"
  local args=(--config "$config" --workdir "$WORKDIR")
  if [[ -n ${DATA_DIR:-} ]]; then args+=("--config.data.data_dir=$DATA_DIR"); fi
  if [[ -n ${MANUAL_DIR:-} ]]; then args+=("--config.data.manual_dir=$MANUAL_DIR"); fi
  args+=("$@")
  local quoted
  printf -v quoted '%q ' "${args[@]}"
  on_workers "cd $remote_dir && setsid nohup python3 -m fdiff_jax train $quoted \
    > ~/$log_file 2>&1 < /dev/null & echo \$! > ~/$pid_file"
}

logs() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 --command "tail -f ~/$log_file"
}

stop() {
  on_workers "kill -TERM \$(cat ~/$pid_file) 2> /dev/null || true"
}

delete() {
  gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
}

case ${1:-} in
  create | install | train | logs | stop | delete)
    command=$1
    shift
    "$command" "$@"
    ;;
  *)
    sed -n '2,17s/^# \{0,1\}//p' "$0" >&2
    exit 2
    ;;
esac
