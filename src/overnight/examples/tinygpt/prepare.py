"""Fixed data loading and evaluation for the tinygpt example.

This file is PROTECTED: the research loop may not edit it. Everything that decides
whether one experiment beats another lives here (the data, the train/val split, the
time budget, the metric), so the only way to get a better number is to train a
better model in train.py.

Data: input.txt, about 1 MB of Shakespeare (see DATA.md), modelled one character
at a time.
"""

import math
import os

import torch
import torch.nn.functional as F

# Seconds of training each experiment gets. The harness sets the variable from
# `budget_seconds` in overnight.toml; 20 s is the default for running by hand.
TIME_BUDGET = float(os.environ.get("OVERNIGHT_BUDGET_SECONDS", "20"))

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_PATH = os.path.join(HERE, "input.txt")

# How many validation characters evaluate_bpb scores: a fixed prefix holding 95% of
# the val split, so every experiment is judged on the same text. Scoring it takes
# about half a second for the baseline model on one CPU core.
EVAL_CHARS = 98304
EVAL_BATCH = 64  # windows per forward pass during evaluation

# ---------------------------------------------------------------------------
# Data: a fixed character vocabulary and a fixed 90/10 split.

with open(DATA_PATH, "rb") as f:
    _raw = f.read()
_text = _raw.decode("ascii")  # the corpus is plain ASCII, so one char is one byte

CHARS = sorted(set(_text))
VOCAB_SIZE = len(CHARS)
STOI = {c: i for i, c in enumerate(CHARS)}
ITOS = dict(enumerate(CHARS))

# Encode through a 256-entry lookup table: much faster than a Python loop over 1M chars.
_lut = torch.zeros(256, dtype=torch.long)
for _c, _i in STOI.items():
    _lut[ord(_c)] = _i
_data = _lut[torch.frombuffer(bytearray(_raw), dtype=torch.uint8).long()]

_n_train = int(0.9 * len(_data))
TRAIN_DATA = _data[:_n_train]
VAL_DATA = _data[_n_train:]


def encode(s):
    return [STOI[c] for c in s]


def decode(ids):
    return "".join(ITOS[int(i)] for i in ids)


def get_batch(split, batch_size, block_size, device, generator=None):
    """Random windows from `split` ("train" or "val"): inputs x and next-char targets y.

    Both are (batch_size, block_size) long tensors on `device`. Pass a seeded
    torch.Generator to make the sequence of batches reproducible.
    """
    data = TRAIN_DATA if split == "train" else VAL_DATA
    # Each window needs block_size + 1 characters: the inputs plus one more target.
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(block_size + 1)
    chunk = data[idx]
    x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate_bpb(model, block_size, device):
    """Validation bits per byte of `model` on a fixed slice of the val split.

    `model(idx)` must map a (B, T) long tensor to (B, T, VOCAB_SIZE) logits.

    The eval text is always the first EVAL_CHARS characters of the val split, cut
    into non-overlapping windows of `block_size`; every character in a window is
    predicted from the ones before it in that window. The windows depend only on
    block_size, never on the other hyperparameters or on any random state, so runs
    are comparable. The score is the mean cross-entropy in nats divided by ln 2, i.e.
    bits per character; the text is ASCII, so characters and bytes are the same thing
    and this is bits per byte.
    """
    n_windows = EVAL_CHARS // block_size
    if n_windows < 1:
        raise ValueError(f"block_size {block_size} is larger than EVAL_CHARS {EVAL_CHARS}")
    tokens = VAL_DATA[: n_windows * block_size + 1]
    x_all = tokens[:-1].view(n_windows, block_size)
    y_all = tokens[1:].view(n_windows, block_size)

    was_training = model.training
    model.eval()  # no dropout while scoring
    use_bf16 = torch.device(device).type == "cuda"
    total_nats = 0.0
    for i in range(0, n_windows, EVAL_BATCH):
        x = x_all[i : i + EVAL_BATCH].to(device)
        y = y_all[i : i + EVAL_BATCH].to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x)
        # Score in float32 whatever precision the forward pass ran in.
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
        )
        total_nats += loss.item()
    model.train(was_training)
    return total_nats / (n_windows * block_size) / math.log(2)


def print_summary(val_bpb, training_seconds, total_seconds, peak_vram_mb, num_steps, num_params):
    """Print the block the harness parses: `---`, then one `key: value` per line."""
    rows = [
        ("val_bpb", f"{val_bpb:.6f}"),
        ("training_seconds", f"{training_seconds:.1f}"),
        ("total_seconds", f"{total_seconds:.1f}"),
        ("peak_vram_mb", f"{peak_vram_mb:.1f}"),
        ("num_steps", f"{num_steps:d}"),
        ("num_params_M", f"{num_params / 1e6:.2f}"),
    ]
    print("---")
    for key, value in rows:
        print(f"{key + ':':<18}{value}")


if __name__ == "__main__":
    # `python prepare.py` shows what the data looks like; train.py only imports it.
    print(
        f"{len(_data):,} chars, vocab {VOCAB_SIZE}, "
        f"train {len(TRAIN_DATA):,}, val {len(VAL_DATA):,}"
    )
    print(f"eval scores the first {EVAL_CHARS:,} val chars")
    print(repr(decode(VAL_DATA[:200])))
