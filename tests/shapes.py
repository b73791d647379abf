"""Repositories shaped like the ones users bring, written for these tests (stdlib only, so a
run takes a fraction of a second): an autoresearch-style one (UPPER_CASE constants, a
protected prepare.py with the time budget and the evaluation, a program.md for a stand-alone
agent) and a nanoGPT-style one (lowercase globals overridden by an exec'd config file and
`--key=value` arguments, git-ignored data, an iteration budget, `step N: ... val loss X`).
"""

from __future__ import annotations

# -- autoresearch-shaped ----------------------------------------------------------------------

PREPARE = '''\
"""Fixed for every experiment: the budget, the sequence length, the evaluation."""

TIME_BUDGET = 2          # seconds of training per run
SEQ_LEN = 32             # tokens per row
EVAL_ROWS = 8            # rows the evaluation reads


def evaluate(loss_fn):
    """Bits per byte of the model on the held-out rows: the one true metric."""
    return sum(loss_fn(i) for i in range(EVAL_ROWS)) / EVAL_ROWS
'''

TRAIN = '''\
"""Trains a pretend model: its loss is a bowl around good settings."""
import math
import time

from prepare import SEQ_LEN, TIME_BUDGET, evaluate

PEAK_FLOPS = 9.9e14      # of the accelerator, for the utilisation figure only
TOTAL_BATCH = 2**12      # tokens per optimizer step
LR = 0.02                # learning rate
BETA2 = 0.95             # second-moment decay
WARMUP_FRAC = 0.0        # fraction of the budget spent warming up
FINAL_LR_RATIO = 0.0     # last learning rate, as a fraction of the first
DEPTH = 4                # layers
BATCH = 64               # rows per forward pass (a power of two)

assert TOTAL_BATCH % (BATCH * SEQ_LEN) == 0, "BATCH * SEQ_LEN must divide TOTAL_BATCH"
accum = TOTAL_BATCH // (BATCH * SEQ_LEN)
assert WARMUP_FRAC >= 0 and FINAL_LR_RATIO >= 0, "fractions cannot be negative"

step = 0
start = time.time()
while step < 20 and time.time() - start < TIME_BUDGET:
    step += 1


def loss_at(i):
    return (1.0 + (math.log10(LR) + 2.0) ** 2 + (BETA2 - 0.97) ** 2 + 0.01 * DEPTH
            + 0.1 * WARMUP_FRAC + 0.1 * FINAL_LR_RATIO + 0.001 * i)


val_bpb = evaluate(loss_at)
mfu = 100 * step * 6 * TOTAL_BATCH / PEAK_FLOPS
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"mfu_percent:      {mfu:.2f}")
print(f"num_steps:        {step}")
'''

PROGRAM = '''\
# Research

You are an autonomous researcher. Set up first:

1. Create a fresh branch: `git checkout -b research/<tag>`.
2. Read prepare.py and train.py.

Then LOOP FOREVER:

- Edit train.py with one idea, then `git commit -am "idea"`.
- Run it: `uv run train.py > run.log 2>&1`, and read `grep "^val_bpb:" run.log`.
- Append a line to results.tsv.
- If val_bpb went down keep the commit, else `git reset --hard HEAD~1`.

Never stop to ask the human whether to go on.
'''


def autoresearch_like() -> dict[str, str]:
    return {"prepare.py": PREPARE, "train.py": TRAIN, "program.md": PROGRAM}


# -- nanoGPT-shaped -------------------------------------------------------------------------

NANO_TRAIN = '''\
"""A tiny character model trainer, configured by globals (and config files)."""
import os
import struct

# defaults, overridden by a config file and --key=value arguments
out_dir = "out"
eval_interval = 5
eval_iters = 4
log_interval = 1
dataset = "tiny"
batch_size = 8
n_layer = 2
learning_rate = 1e-3
beta2 = 0.99
dropout = 0.0
max_iters = 20
seed = 1337
exec(open("configurator.py").read())  # the config file and --key=value win

with open(os.path.join("data", dataset, "train.bin"), "rb") as f:
    data = f.read()
tokens = struct.unpack(f"{len(data)}B", data)

iter_num = 0
best = None
while iter_num <= max_iters:
    if iter_num % eval_interval == 0:
        quality = abs(learning_rate - 3e-3) * 100 + abs(beta2 - 0.95) + 0.01 * n_layer
        val = 1.0 + quality + 1.0 / (1 + iter_num) + sum(tokens[:eval_iters]) / 1e6
        print(f"step {iter_num}: train loss {val + 0.05:.4f}, val loss {val:.4f}")
    iter_num += 1
'''

CONFIGURATOR = '''\
import sys

for arg in sys.argv[1:]:
    if not arg.startswith("--"):
        exec(open(arg).read())  # a config file: its assignments override the defaults
        continue
    key, value = arg[2:].split("=", 1)
    if key not in globals():
        raise ValueError(f"unknown config key {key}")
    globals()[key] = type(globals()[key])(value)
'''

NANO_CONFIG = '''\
# a small run on the tiny dataset
eval_interval = 5
learning_rate = 2e-3
beta2 = 0.99
max_iters = 10
'''


def nanogpt_like() -> dict[str, str]:
    return {"train.py": NANO_TRAIN, "configurator.py": CONFIGURATOR,
            "config/small.py": NANO_CONFIG, ".gitignore": "data/*/train.bin\n"}


def nanogpt_data() -> bytes:
    """The git-ignored dataset: written by the test, never committed."""
    return bytes(range(32, 127)) * 4
