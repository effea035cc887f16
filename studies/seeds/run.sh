#!/usr/bin/env bash
# More training seeds for the two bars that sit inside the seed-to-seed noise (issues 13 and 14), run on a lent
# GPU where many small trainings share one card (the CPU here would need 13 min per model, one at a time).
# `make seed-study` runs it (SEEDS, SEED_JOBS), then writes summary.md.
# For each seed in SEEDS, three models train for the steps that fit the default's time on the 2-core CPU:
#   centre  today's defaults (3700 steps of 64)            -> eval on the centre box and the off-centre box
#   box     issue 14's best recipe, the same 3700 steps     -> eval on the centre box and the off-centre box
#   old     the defaults issue 13 was filed against          -> eval on the centre box with their sampler
#           (2000 steps of 128 at lr 2e-3; 50 DDIM steps, eta 0, 4 samples)
# Every eval scores all 1,000 test digits, with the training seed as its sampling seed (as on the CPU).
# JOBS runs at once. TRAIN_ARGS / EVAL_ARGS are appended (the last flag wins: a quick check passes
# TRAIN_ARGS="--steps 5" EVAL_ARGS="--n-eval 20"). Results: RESULTS/NAME-sSEED-on-SET/inpaint_metrics.json,
# logs in RESULTS/logs; `python3 studies/seeds/summary.py` turns them into the tables in README.
set -u
PYTHON=${PYTHON:-python3}
SEEDS=${SEEDS:-2 3 4 5}
JOBS=${JOBS:-12}
WORK=${WORK:-outputs/seeds}
RESULTS=${RESULTS:-studies/seeds}
export PYTHON WORK RESULTS TRAIN_ARGS=${TRAIN_ARGS:-} EVAL_ARGS=${EVAL_ARGS:-} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

job() {  # job NAME SEED
  local name=$1 seed=$2 flags evals
  case $name in
    centre) flags="" ;;
    box)    flags="--train-mask box --train-box-sides 12-20 --train-mask-centre 0.5 --hole-weight 16" ;;
    old)    flags="--steps 2000 --batch-size 128 --lr 2e-3" ;;
  esac
  local dir=$WORK/$name-s$seed log=$RESULTS/logs/$name-s$seed.txt
  mkdir -p "$RESULTS/logs"
  (  # a subshell: a failing step ends this job alone, and the line below still reports it
    $PYTHON ddim_inpaint.py train --data mnist5k --seed "$seed" --panel-every 0 --out-dir "$dir" $flags $TRAIN_ARGS \
      || exit 1
    if [ "$name" = old ]; then
      evals="centre:--mask-set=centre:--ddim-steps=50:--eta=0:--num-samples=4"
    else
      evals="centre:--mask-set=centre offcentre:--mask=examples/mask_offcentre.png"
    fi
    for e in $evals; do
      $PYTHON ddim_inpaint.py eval --data mnist5k --n-eval 1000 --seed "$seed" --ckpt "$dir/last.pt" \
        --results-dir "$RESULTS/$name-s$seed-on-${e%%:*}" $(echo "${e#*:}" | tr ':=' '  ') $EVAL_ARGS || exit 1
    done
  ) > "$log" 2>&1
  echo "$name-s$seed: exit $? after $SECONDS s"
}
export -f job

for seed in $SEEDS; do for name in centre box old; do echo "$name $seed"; done; done | xargs -P "$JOBS" -L 1 bash -c 'job "$@"' _
