#!/bin/bash
# Submit a LOSO run to SLURM from the shell (backs `make loso-slurm`):
#
#   [preprocess.sbatch]  ->  loso_array.sbatch, one task per PENDING fold  ->  aggregate.sbatch
#        (afterok)                (throttled %P, requeue + resume)             (afterany)
#
#   experiments/slurm/submit.sh --exp famnet --wandb offline [--folds 0,3] [--threads 4] \
#       [--slurm-partition gpu --slurm-time 240 --slurm-gpus-per-task 1 --slurm-parallelism 8] \
#       --config experiments/base.yaml --config experiments/data/casme2.yaml \
#       --config experiments/model/famnet.yaml [--data.data_root=/data/CASME2 ...]
#
# Takes the options of `famnet-pl loso` (the plan comes from `python -m famnet_pl.cli slurm plan`,
# which reads them with the same parser), so a run submitted here and one run locally write the
# same runs/<exp>/<dataset>/. Only folds without predictions.csv are submitted: run it again after
# failures, preemptions or a changed --folds; it refuses while this run's previous jobs are queued.
# Logs: <run>/logs/fold_<kk>-<array job>.log (one per fold, requeues append), preprocess-<job>.log,
# aggregate-<job>.log. Defaults (time, CPUs, partition, GPUs) are the #SBATCH lines of the .sbatch
# files next to this script: edit them for your cluster.
#
# Environment:
#   PYTHON       interpreter with famnet_pl installed (default: python); the jobs run it by absolute path
#   PREPROCESS   job (default: a preprocessing job first), here (in this shell, now), no
#   SBATCH_ARGS  extra sbatch options for every job, e.g. "--account=abc --qos=normal"
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
PREPROCESS=${PREPROCESS:-job}
read -r -a EXTRA <<<"${SBATCH_ARGS:-}"
command -v sbatch >/dev/null || { echo "submit.sh: sbatch not found: install the SLURM client (Debian: apt install slurm-client) or run this on a cluster login node" >&2; exit 1; }
command -v "$PYTHON" >/dev/null || { echo "submit.sh: $PYTHON not found: set PYTHON to the interpreter that has famnet_pl (e.g. PYTHON=.venv/bin/python)" >&2; exit 1; }
case $PREPROCESS in job|here|no) ;; *) echo "submit.sh: PREPROCESS=$PREPROCESS: use job, here or no" >&2; exit 2;; esac

# Sets RUN_DIR N_FOLDS PENDING JOB_NAME LOG_DIR ARRAY_LOG JOBS_FILE PARALLEL and the arrays
# FOLD_FLAGS JOB_FLAGS WORKER PREPARE AGGREGATE (shell-quoted by Python); writes run.json.
plan=$("$PYTHON" -m famnet_pl.cli slurm plan "$@")
eval "$plan"
if [ -z "$PENDING" ]; then
  echo "no pending fold: the selected folds of $RUN_DIR ($N_FOLDS in all) are finished; aggregating here"
  exec "${AGGREGATE[@]}" --folds ""
fi
mkdir -p "$LOG_DIR"
jobid() { local out; out=$(sbatch --parsable "$@") || return 1; echo "${out%%;*}"; }  # "id" or "id;cluster"
# The ids go to JOBS_FILE as soon as each job exists: a resubmission refuses while any is queued.
record() { echo "$*" >"$JOBS_FILE"; }

after=()
P=
if [ "$PREPROCESS" = job ]; then
  P=$(jobid --job-name="$JOB_NAME-prep" --output="$LOG_DIR/preprocess-%j.log" "${JOB_FLAGS[@]}" "${EXTRA[@]}" \
      "$HERE/preprocess.sbatch" "${PREPARE[@]}")
  record "$P"
  # kill-on-invalid-dep: if preprocessing fails the folds are cancelled (not left pending forever);
  # the aggregation job then reports them missing.
  after=(--dependency="afterok:$P" --kill-on-invalid-dep=yes)
elif [ "$PREPROCESS" = here ]; then
  "${PREPARE[@]}"
fi
A=$(jobid --array="$PENDING${PARALLEL:+%$PARALLEL}" --job-name="$JOB_NAME" --output="$ARRAY_LOG" \
    "${after[@]}" "${FOLD_FLAGS[@]}" "${EXTRA[@]}" "$HERE/loso_array.sbatch" "${WORKER[@]}")
record "$P" "$A"
G=$(jobid --dependency="afterany:$A" --job-name="$JOB_NAME-aggregate" --output="$LOG_DIR/aggregate-%j.log" \
    "${JOB_FLAGS[@]}" "${EXTRA[@]}" "$HERE/aggregate.sbatch" "${AGGREGATE[@]}" --array-job "$A" --folds "$PENDING")
record "$P" "$A" "$G"
echo "submitted ${P:+preprocessing $P, }fold array $A (folds $PENDING${PARALLEL:+, $PARALLEL at a time}), aggregation $G"
echo "follow: squeue -j ${P:+$P,}$A,$G   logs: $LOG_DIR   summary: $RUN_DIR/loso_summary.json"
