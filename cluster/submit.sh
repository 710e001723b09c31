#!/usr/bin/env bash
# Submit a raytrain training run, sweep, evaluation, conversion or batch prediction to the Ray cluster at $RAY_ADDRESS.
# Run `cluster/submit.sh --help` for usage.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: cluster/submit.sh {train|tune|eval|shard|predict} [raytrain arguments...]

Submits `raytrain <command> <arguments>` as a Ray job to the cluster at $RAY_ADDRESS, with the
repository root as working directory and cluster/runtime_env.yaml as runtime environment:

  ray job submit --no-wait --working-dir . --runtime-env cluster/runtime_env.yaml \
      -- raytrain <command> <arguments>

then prints how to follow the logs and where the results land.

Examples:
  export RAY_ADDRESS=http://127.0.0.1:8265      # e.g. after `ray dashboard cluster/aws.yaml`
  cluster/submit.sh train --config configs/r50_paper.yaml train.storage_path=s3://BUCKET/raytrain/runs
  cluster/submit.sh tune  --config configs/r50_paper.yaml --space tune/spaces/paper.yaml --trials 64
  cluster/submit.sh eval  --experiment s3://BUCKET/raytrain/runs/tune/NAME --best --data s3://BUCKET/shards/3dpw-test
  cluster/submit.sh shard coco --npz /data/coco2014part_cliffGT.npz --img-root /data/coco \
      --out s3://BUCKET/shards/coco --ray            # Ray tasks on the data_cpu nodes
  cluster/submit.sh predict --ray --checkpoint /mnt/checkpoints/runs/NAME/checkpoint_000010 \
      --detections s3://BUCKET/frames/detections.json --out /mnt/checkpoints/predict s3://BUCKET/frames/

Environment:
  RAY_ADDRESS             Ray dashboard / job server address (required), e.g. http://HEAD:8265
  RAYTRAIN_SUBMISSION_ID  job id to use (default: raytrain-<command>-<UTC time>-<random>)
  RAYTRAIN_DRY_RUN=1      print the `ray job submit` command instead of running it
USAGE
}

case "${1:-}" in
    -h | --help | help)
        usage
        exit 0
        ;;
    train | tune | eval | shard | predict) ;;
    "")
        usage >&2
        exit 2
        ;;
    *)
        echo "submit.sh: unknown command '$1' (expected train, tune, eval, shard or predict; see --help)" >&2
        exit 2
        ;;
esac
cmd=$1
shift

if [[ -z "${RAY_ADDRESS:-}" ]]; then
    echo "submit.sh: RAY_ADDRESS is not set. Point it at the cluster's job server, e.g." >&2
    echo "  export RAY_ADDRESS=http://127.0.0.1:8265   # after 'ray dashboard cluster/aws.yaml' or a kubectl port-forward" >&2
    exit 2
fi

# The working directory shipped to the cluster is the repository root, wherever this is run from.
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

submission_id=${RAYTRAIN_SUBMISSION_ID:-"raytrain-${cmd}-$(date -u +%Y%m%d-%H%M%S)-${RANDOM}"}

submit=(
    ray job submit
    --address "$RAY_ADDRESS"
    --submission-id "$submission_id"
    --no-wait
    --working-dir .
    --runtime-env cluster/runtime_env.yaml
    -- raytrain "$cmd" "$@"
)

if [[ "${RAYTRAIN_DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${submit[@]}"
    printf '\n'
else
    if ! command -v ray > /dev/null 2>&1; then
        echo "submit.sh: 'ray' not found on PATH; activate the project environment (make venv; . .venv/bin/activate)" >&2
        exit 127
    fi
    "${submit[@]}"
fi

# Where results land: an explicit storage_path override wins, else the config's setting
# (eval and predict write to --out, shard its shards).
storage=""
prev=""
for arg in "$@"; do
    case "$arg" in
        *storage_path=*) storage=${arg#*storage_path=} ;;
        --out=*)
            if [[ "$cmd" == "eval" || "$cmd" == "shard" || "$cmd" == "predict" ]]; then
                storage=${arg#--out=}
            fi
            ;;
    esac
    if [[ "$prev" == "--out" && ( "$cmd" == "eval" || "$cmd" == "shard" || "$cmd" == "predict" ) ]]; then
        storage=$arg
    fi
    prev=$arg
done

echo
echo "Submitted job '$submission_id' to $RAY_ADDRESS."
echo "Follow its logs:   ray job logs -f $submission_id --address $RAY_ADDRESS"
echo "Status / stop:     ray job status $submission_id   |   ray job stop $submission_id"
case "$cmd" in
    train) what="checkpoints and metrics" ;;
    tune) what="trial checkpoints, results and the best-trial export" ;;
    eval) what="the evaluation report" ;;
    shard) what="the shards and manifest.json" ;;
    predict) what="predictions.jsonl (or predictions.parquet/) and summary.json" ;;
esac
if [[ -n "$storage" ]]; then
    echo "Results:           $what under $storage"
else
    if [[ "$cmd" == "eval" ]]; then
        echo "Results:           $what in raytrain eval's default report directory (pass --out to choose)."
    elif [[ "$cmd" == "predict" ]]; then
        echo "Results:           $what under runs/predict inside the job's working dir on the head node;"
        echo "                   pass --out with a shared volume path."
    else
        echo "Results:           $what under the config's train.storage_path."
        echo "                   A relative path (e.g. runs/) lands on the head node inside the job's"
        echo "                   temporary working dir; on a multi-node cluster pass"
        echo "                   train.storage_path=s3://... , gs://... or a shared volume path."
    fi
fi
