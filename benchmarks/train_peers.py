"""The peers `python -m pretrain` is measured against (benchmarks/bench_train.py runs each as a subprocess).

    python benchmarks/train_peers.py bare|hf --data DIR --n-layer 6 --n-head 6 --d-model 384 --precision fp32|bf16

`bare`: a GPT training loop as one would write it in an afternoon with plain PyTorch, written apart from this
project (nothing imported from `pretrain`): pre-LN blocks, causal `scaled_dot_product_attention`, GELU (tanh),
tied embeddings, GPT-2 initialisation; AdamW with decay on matrices only, warmup then cosine, gradient
clipping at 1.0; the training samples read from the shards into memory once, a shuffled order, no workers.
bf16 is `torch.autocast` over fp32 weights, the way a plain loop does mixed precision.

`hf`: transformers.Trainer on a `GPT2LMHeadModel` of the same shape (SDPA attention, tied embeddings, no
dropout), the same samples, hyper-parameters and optimizer, `bf16=True` for bf16 (autocast).

Both use AdamW's fused kernel (torch >= 2.4 has one on CPU; it is transformers' default optimizer): the
fastest way torch does the update, so the comparison shows what the frameworks add, not which optimizer loop
they picked. Each prints one JSON line: the wall-clock time at the end of every step (time.time()).
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The run's hyper-parameters: `python -m pretrain`'s defaults, which bench_train.py passes to all three systems.
BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP, MIN_LR_RATIO = (0.9, 0.95), 1e-8, 0.1, 1.0, 0.1


def load_samples(data: Path) -> torch.Tensor:
    """Every training sample of the shards (seq_len + 1 tokens each) as one (N, seq_len + 1) int64 tensor."""
    manifest = json.loads((data / "manifest.json").read_text())
    samples = []
    for shard in manifest["splits"]["train"]["shards"]:
        with tarfile.open(data / shard["name"]) as tar:
            for member in tar:
                if member.name.endswith(".tokens.npy"):
                    samples.append(np.load(io.BytesIO(tar.extractfile(member).read())))  # type: ignore[union-attr]
    return torch.from_numpy(np.stack(samples).astype(np.int64))


# ------------------------------------------------------------------------------------------- bare PyTorch


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.attn_out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.mlp_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        for linear in (self.qkv, self.attn_out, self.fc, self.mlp_out):
            std = 0.02 / math.sqrt(2 * n_layer) if linear in (self.attn_out, self.mlp_out) else 0.02
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(C, 2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_out(y)
        return x + self.mlp_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class BareGPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_head: int, n_layer: int, context: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, d), nn.Embedding(context, d)
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.blocks = nn.Sequential(*(Block(d, n_head, n_layer) for _ in range(n_layer)))
        self.ln = nn.LayerNorm(d)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tokens(inputs) + self.positions(torch.arange(inputs.shape[1]))
        logits = self.ln(self.blocks(x)) @ self.tokens.weight.T  # tied output head
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def schedule(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def bare(args: argparse.Namespace, samples: torch.Tensor) -> list[float]:
    torch.manual_seed(args.seed)
    model = BareGPT(args.vocab, args.d_model, args.n_head, args.n_layer, samples.shape[1] - 1)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": WEIGHT_DECAY}, {"params": others, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=BETAS, eps=EPS, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, args.warmup, args.steps))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed))
    ends = []
    for step in range(args.steps):
        batch = samples[order[step * args.micro_batch : (step + 1) * args.micro_batch]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        ends.append(time.time())
    return ends


# ---------------------------------------------------------------------------------- transformers.Trainer


def hf(args: argparse.Namespace, samples: torch.Tensor) -> list[float]:
    import tempfile

    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    seq_len = samples.shape[1] - 1
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=seq_len,
        n_embd=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    # GPT-2 shifts labels inside: the sample's first seq_len tokens as inputs and labels (seq_len - 1 targets).
    dataset = [{"input_ids": s[:-1], "labels": s[:-1]} for s in samples[: args.steps * args.micro_batch]]
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_: object, **__: object) -> None:
            ends.append(time.time())

    with tempfile.TemporaryDirectory() as out:
        settings = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.micro_batch,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATIO},
            warmup_steps=args.warmup,
            weight_decay=WEIGHT_DECAY,
            adam_beta1=BETAS[0],
            adam_beta2=BETAS[1],
            adam_epsilon=EPS,
            max_grad_norm=GRAD_CLIP,
            optim="adamw_torch_fused",
            bf16=args.precision == "bf16",
            use_cpu=True,
            dataloader_num_workers=0,
            logging_steps=max(1, args.steps),
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            seed=args.seed,
        )
        Trainer(model=model, args=settings, train_dataset=dataset, callbacks=[Clock()]).train()
    return ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=["bare", "hf"])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--n-layer", type=int, required=True)
    parser.add_argument("--n-head", type=int, required=True)
    parser.add_argument("--d-model", type=int, required=True)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--keep-host-memory",
        action="store_true",
        help="glibc malloc keeps freed memory (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD max), as `python -m pretrain` "
        "does by default (train.keep_host_memory): no page faults on every step's fresh tensors",
    )
    args = parser.parse_args()
    if args.keep_host_memory:
        libc = ctypes.CDLL("libc.so.6")
        assert libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2**31 - 1) == 1, "mallopt refused"
    args.vocab = json.loads((args.data / "manifest.json").read_text())["vocab_size"]
    samples = load_samples(args.data)
    ends = (bare if args.system == "bare" else hf)(args, samples)
    print(json.dumps({"system": args.system, "step_end_times": ends, "threads": torch.get_num_threads()}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
