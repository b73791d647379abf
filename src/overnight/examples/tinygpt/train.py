# ruff: noqa: E402  (the clock starts before the imports, on purpose)
"""Train a tiny character-level GPT on Shakespeare for a fixed wall-clock budget.

This is the file the research loop edits. The hyperparameters are the plain
constants just below; everything else is one straight read: the model, the
training loop, then evaluation and the summary the harness parses.

The rules live in prepare.py (protected): training stops after TIME_BUDGET seconds
of wall-clock time, and the score is val_bpb, validation bits per byte (lower is
better). So the question every experiment asks is: what trains best in 20 seconds?

Run it by hand with `python train.py`; set OVERNIGHT_BUDGET_SECONDS to change
the budget.
"""

import time

t_start = time.time()  # total_seconds counts imports and data loading too

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from prepare import TIME_BUDGET, VOCAB_SIZE, evaluate_bpb, get_batch, print_summary

# ---------------------------------------------------------------------------
# Hyperparameters. Plain numeric literals, so the search can read and rewrite them.

LEARNING_RATE = 6e-4  # peak AdamW learning rate
WEIGHT_DECAY = 0.1  # AdamW decoupled weight decay, on 2-D weights only
ADAM_BETA2 = 0.99  # second-moment decay; lower reacts faster on short runs
WARMUP_STEPS = 20  # linear learning-rate warmup from zero, in optimizer steps
MIN_LR_FRAC = 0.1  # the cosine decay ends at this fraction of the peak rate
GRAD_CLIP = 1.0  # clip the global gradient norm to this (0 turns clipping off)
BATCH_SIZE = 32  # sequences per optimizer step
BLOCK_SIZE = 32  # context length in characters
N_LAYER = 2  # transformer blocks
N_HEAD = 4  # attention heads per block; must divide N_EMBD
N_EMBD = 64  # width of the residual stream
MLP_RATIO = 4  # hidden width of each MLP, as a multiple of N_EMBD
DROPOUT = 0.0  # dropout rate; a 20 s run underfits, so none (it also slows CPU steps)
SEED = 1337  # seeds initialisation and batch sampling
CPU_THREADS = 1  # torch threads on CPU (0 = torch's default); see the device section
LOG_EVERY_SECONDS = 2.0  # how often to print a progress line

# ---------------------------------------------------------------------------
# Device. A GPU if there is one (in bfloat16 autocast), otherwise the CPU.

device = "cuda" if torch.cuda.is_available() else "cpu"
use_bf16 = device == "cuda"
if device == "cpu" and CPU_THREADS > 0:
    # A model this small runs many tiny matmuls; on a 2-core VM one thread was both
    # faster and far steadier than two, which spent much of their time waiting on
    # each other. Steady speed matters: a slow stretch means fewer steps in the budget.
    torch.set_num_threads(CPU_THREADS)
torch.manual_seed(SEED)
batch_gen = torch.Generator().manual_seed(SEED)  # its own stream: same batches for any model

# ---------------------------------------------------------------------------
# Model: token + position embeddings, pre-norm transformer blocks, tied output head.


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.proj = nn.Linear(N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim): each head attends on its own slice.
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=DROPOUT if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(N_EMBD, MLP_RATIO * N_EMBD, bias=False)
        self.down = nn.Linear(MLP_RATIO * N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(N_EMBD)
        self.attn = CausalSelfAttention()
        self.ln2 = nn.LayerNorm(N_EMBD)
        self.mlp = MLP()
        self.drop = nn.Dropout(DROPOUT)

    def forward(self, x):
        # Pre-norm: each sublayer reads a normalised copy and adds to the residual stream.
        x = x + self.drop(self.attn(self.ln1(x)))
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB_SIZE, N_EMBD)
        self.pos_emb = nn.Embedding(BLOCK_SIZE, N_EMBD)
        self.drop = nn.Dropout(DROPOUT)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD)
        self.head = nn.Linear(N_EMBD, VOCAB_SIZE, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: one matrix reads and writes characters

        # GPT-2 style init: small normal weights, and the projections that write into
        # the residual stream scaled down so its variance does not grow with depth.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02
                if name.endswith(("proj.weight", "down.weight")):
                    std /= math.sqrt(2 * N_LAYER)
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx):
        T = idx.size(1)
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, VOCAB_SIZE) logits


model = GPT().to(device)
num_params = sum(p.numel() for p in model.parameters())

# Weight decay on the 2-D tensors (linear weights and the tied embedding); none on
# LayerNorm gains and biases, which only set scales and offsets.
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW(
    [
        {"params": decay, "weight_decay": WEIGHT_DECAY},
        {"params": no_decay, "weight_decay": 0.0},
    ],
    lr=LEARNING_RATE,
    betas=(0.9, ADAM_BETA2),
)


def lr_at(step, progress):
    """Linear warmup over WARMUP_STEPS, then cosine decay over the time budget.

    The decay follows elapsed time, not steps, because the number of steps a run
    gets is unknown in advance: it depends on the model size and the machine.
    """
    warm = min(1.0, (step + 1) / max(WARMUP_STEPS, 1))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return LEARNING_RATE * warm * (MIN_LR_FRAC + (1.0 - MIN_LR_FRAC) * cosine)


# ---------------------------------------------------------------------------
# Training: step until TIME_BUDGET seconds of wall-clock time have passed.

print(f"device {device} | {num_params / 1e6:.2f}M params | budget {TIME_BUDGET:.0f}s")
model.train()
step = 0
t_train = time.time()
last_log = t_train
while True:
    # overnight: protect -- the time budget is the rule every experiment plays by
    elapsed = time.time() - t_train
    if elapsed >= TIME_BUDGET:
        break
    # overnight: end
    lr = lr_at(step, elapsed / TIME_BUDGET)
    for group in optimizer.param_groups:
        group["lr"] = lr

    x, y = get_batch("train", BATCH_SIZE, BLOCK_SIZE, device, batch_gen)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), y.view(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if GRAD_CLIP > 0:
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    step += 1

    loss_value = loss.item()  # also waits for the GPU, so the clock above stays honest
    if not math.isfinite(loss_value):
        # A diverged run has no meaningful score; fail loudly so it is not kept.
        print(f"loss is {loss_value} at step {step}; stopping", file=sys.stderr)
        sys.exit(1)
    now = time.time()
    if now - last_log >= LOG_EVERY_SECONDS:
        print(f"step {step} | loss {loss_value:.4f} | lr {lr:.2e} | {now - t_train:.1f}s")
        last_log = now

training_seconds = time.time() - t_train

# ---------------------------------------------------------------------------
# Evaluation and the summary block the harness reads.

# overnight: protect -- the score and how it is reported are not the experiment's to change
val_bpb = evaluate_bpb(model, BLOCK_SIZE, device)
peak_vram_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
print_summary(
    val_bpb=val_bpb,
    training_seconds=training_seconds,
    total_seconds=time.time() - t_start,
    peak_vram_mb=peak_vram_mb,
    num_steps=step,
    num_params=num_params,
)
# overnight: end
