# Trivial workload for bench/overhead.py, shell-cheap: bash start-up plus one awk call.
# Computes the same val_loss as train.py from train.py's knobs, and appends
# prints "BENCH_TIMES <experiment id> <start> <exit>" last ($EPOCHREALTIME: no fork to read the
# clock; on stdout, because a boxed run cannot write outside its own directories).
t0=$EPOCHREALTIME
awk -F' *= *' '
  $1 == "LEARNING_RATE" { a = $2 } $1 == "WEIGHT_DECAY" { b = $2 } $1 == "WARMUP_RATIO" { c = $2 }
  END { l = log(10); printf "val_loss: %.6f\n", 1 + (log(a)/l + 2.5)^2 + (log(b)/l + 1)^2 + (log(c)/l + 1.5)^2 }
' train.py
[ "${BENCH_WORK_SECONDS:-0}" = 0 ] || sleep "$BENCH_WORK_SECONDS"
t1=$EPOCHREALTIME
echo "BENCH_TIMES ${OVERNIGHT_EXPERIMENT_ID:--} $t0 $t1"
