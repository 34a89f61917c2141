#!/usr/bin/env bash
# The demo, end to end on this machine (docs/demo.md):
#   1. set up .venv (first time: ~2 min);
#   2. generate a synthetic long-tailed identity set + held-out verification pairs (demo_out/data);
#   3. start a private local Ray head that listens on 127.0.0.1 only (its own temp dir, ports and auth token);
#   4. `ray job submit` the training job: 2 CPU workers, DeepSpeed on gloo, the class-sharded classifier,
#      DALI CPU decoding, verification on the held-out identities during training, MLflow on sqlite;
#   5. stop that Ray head (only it: never `ray stop`) and print a summary.
# Environment knobs: DEMO_STEPS (training steps, default from configs/tiny_cpu.yaml), DEMO_OUT (output folder,
# default demo_out), DEMO_SET (extra "--set k=v" overrides, space separated).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"

OUT="$(mkdir -p "${DEMO_OUT:-$ROOT/demo_out}" && cd "${DEMO_OUT:-$ROOT/demo_out}" && pwd)"
CONFIG=configs/tiny_cpu.yaml
DATA="$OUT/data"
RUN="$OUT/run"
DB="$OUT/mlruns.db"
SUMMARY="$OUT/summary.json"
START=$(date +%s)

# ---------------------------------------------------------------- 1. data
if [ ! -f "$DATA/manifest.json" ] || [ ! -f "$DATA/holdout_pairs.npz" ]; then
  echo "[demo] generating the synthetic identity set in $DATA"
  distrib-face synth "$DATA" --identities 200 --image-size 48 --holdout 40 --pairs 400
else
  echo "[demo] reusing the synthetic identity set in $DATA"
fi
rm -rf "$RUN" "$SUMMARY"  # a fresh run each time (a kept run folder would be resumed, already finished)

# ---------------------------------------------------------------- 2. a private Ray head
# launch/local_ray.py starts `ray start --head --block` in its own session (one process group: stop_head ends
# exactly what it started), with its own temp dir, token file and free ports, listening on 127.0.0.1 only
# (docs/ray.md, "What listens where"), and prints the RAY_HEAD_* / RAY_AUTH_* variables for the CLI.
# Unix socket paths under the temp dir must stay below 107 bytes: fall back to /tmp for deep checkouts.
RAY_TMP="$OUT/ray" RAY_TMP_IS_OURS=0
if [ "${#RAY_TMP}" -gt 40 ]; then RAY_TMP="$(mktemp -d /tmp/dfdemo_XXXXXX)" RAY_TMP_IS_OURS=1; fi
RAY_HEAD_PGID=""

stop_head() {
  if [ -n "$RAY_HEAD_PGID" ]; then
    echo "[demo] stopping the Ray head (process group $RAY_HEAD_PGID)"
    python launch/local_ray.py stop "$RAY_HEAD_PGID" || true
  fi
  RAY_HEAD_PGID=""
  if [ "$RAY_TMP_IS_OURS" = 1 ]; then rm -rf "$RAY_TMP"; fi
}
trap stop_head EXIT
trap 'exit 130' INT TERM

echo "[demo] starting a Ray head on 127.0.0.1 (temp dir $RAY_TMP, log $OUT/ray_head.log)"
# The head runs under .venv's python (PATH), so the job's driver and the workers do too.
HEAD_VARS="$(python launch/local_ray.py start --temp-dir "$RAY_TMP" --num-cpus 2 --log "$OUT/ray_head.log")" || {
  echo "[demo] the Ray head did not come up; see $OUT/ray_head.log" >&2; exit 1; }
eval "$HEAD_VARS"
ADDRESS="$RAY_HEAD_ADDRESS"
echo "[demo] Ray head up: job API $ADDRESS"

# ---------------------------------------------------------------- 3. the training job
SETS=(--set "data.shards=$DATA" --set "train.output_dir=$RUN" --set "train.eval_pairsets=[$DATA/holdout_pairs.npz]"
      --set "tracking.tracking_uri=sqlite:///$DB" --set "ray.num_workers=2")
if [ -n "${DEMO_STEPS:-}" ]; then
  SETS+=(--set "train.total_steps=$DEMO_STEPS" --set "train.checkpoint_every=$(( (DEMO_STEPS + 2) / 3 ))"
         --set "train.eval_every=$(( (DEMO_STEPS + 2) / 3 ))")
fi
for kv in ${DEMO_SET:-}; do SETS+=(--set "$kv"); done
echo "[demo] submitting: ray job submit --address $ADDRESS --working-dir . -- python launch/ray_job.py --config $CONFIG ..."
ray job submit --address "$ADDRESS" --working-dir . -- \
  python launch/ray_job.py --config "$CONFIG" --base-dir "$ROOT" --summary-json "$SUMMARY" "${SETS[@]}"

stop_head

# ---------------------------------------------------------------- 4. summary
python - "$SUMMARY" "$DB" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
summary, db, seconds = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
before, after = summary.get("verification_before") or {}, summary.get("verification_after") or {}
print()
print("=" * 72)
print(f"distrib_face demo finished in {seconds // 60} min {seconds % 60} s")
print(f"  steps                    {summary['steps']} (2 Ray workers, DeepSpeed on gloo, sharded classifier, DALI CPU)")
print(f"  training speed           {summary['images_per_sec']:.1f} img/s over both workers")
print(f"  final loss               {summary['final_loss']:.4f}")
for name in sorted(set(before) | set(after)):
    b, a = before.get(name), after.get(name)
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    print(f"  verification {name:<11} {fmt(b)} before -> {fmt(a)} after (held-out identities; chance 50%)")
print(f"  MLflow run               {summary['mlflow_run_id']} (experiment {summary['mlflow_experiment']!r})")
print(f"  MLflow store             {summary['tracking_uri']}")
print(f"  MLflow artifacts         {summary['mlflow_artifact_location']}")
print(f"  backbone / ONNX          {summary.get('backbone')} / {summary.get('onnx')}")
print(f"  Ray checkpoints          {summary['ray_result_path']}")
print()
print("Open the MLflow UI:")
print(f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000")
print("=" * 72)
EOF
