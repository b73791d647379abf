"""Trivial workload for bench/overhead.py: a val_loss from three knobs, no training at all.

Run as `python -S train.py` (the python workload); the sh workload (run.sh) reads the same
knobs with awk instead. Either way it prints "BENCH_TIMES <experiment id> <start> <exit>"
(time.time()) last, so the benchmark knows exactly when the process began and ended.
"""

import time

t0 = time.time()  # first thing: as close to "the process started" as Python gets

import math  # noqa: E402
import os  # noqa: E402

LEARNING_RATE = 0.001
WEIGHT_DECAY = 0.1
WARMUP_RATIO = 0.05

# A smooth bowl with its bottom at (10**-2.5, 10**-1, 10**-1.5); nothing is trained.
val_loss = 1.0 + (
    (math.log10(LEARNING_RATE) + 2.5) ** 2
    + (math.log10(WEIGHT_DECAY) + 1.0) ** 2
    + (math.log10(WARMUP_RATIO) + 1.5) ** 2
)
time.sleep(float(os.environ.get("BENCH_WORK_SECONDS", "0")))  # --work-seconds: a longer run
print(f"val_loss: {val_loss:.6f}")

# On stdout, because a boxed run cannot write outside its own directories.
print(f"BENCH_TIMES {os.environ.get('OVERNIGHT_EXPERIMENT_ID', '-')} {t0:.6f} {time.time():.6f}")
