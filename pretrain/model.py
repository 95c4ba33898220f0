"""The GPT causal transformer: a plain single-device `nn.Module`, readable top to bottom.

GPT-2 (Radford et al., 2019) by default: pre-LayerNorm blocks and a final LayerNorm. The original GPT
(Radford et al., 2018) with `norm="post"`: LayerNorm after each residual addition, no final LayerNorm.
Token and learned position embeddings, causal self-attention through `scaled_dot_product_attention` (flash
attention on GPUs), a GELU MLP, input and output embeddings tied, GPT-2 initialisation.

Parallelism never appears here: DeepSpeed wraps this module in `pretrain/engine.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigProblems

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModelConfig:
    """Shape of the transformer. Presets live in conf/model/*.yaml."""

    name: str = "custom"
    # Taken from the dataset's manifest when unset; must equal it when set.
    vocab_size: int | None = None
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    # Longest context; learned position embeddings have this many rows.
    max_seq_len: int = 1024
    dropout: float = 0.0
    # "pre" (GPT-2, default) or "post" (original GPT: LayerNorm after each residual add, no final one).
    norm: str = "pre"
    # "gelu_tanh" (the tanh approximation of GPT-2 and GPT-1) or "gelu" (the exact erf form; Hugging Face's
    # OpenAIGPT "gelu" is the tanh approximation, so post-LN models with exact GELU do not export exactly).
    activation: str = "gelu_tanh"
    mlp_ratio: int = 4
    bias: bool = True
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    # Mask attention across document boundaries recorded in the shards (doc_starts).
    doc_mask: bool = False

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        for key in ("n_layer", "n_head", "d_model", "max_seq_len", "mlp_ratio"):
            value = getattr(self, key)
            problems.check(value >= 1, f"model.{key}", value, "must be >= 1")
        if self.n_head >= 1 and self.d_model % self.n_head:
            problems.add("model.n_head", self.n_head, f"must divide model.d_model={self.d_model}")
        problems.check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")
        problems.check(self.norm in ("pre", "post"), "model.norm", self.norm, "must be pre or post")
        problems.check(
            self.activation in ("gelu", "gelu_tanh"),
            "model.activation",
            self.activation,
            "must be gelu or gelu_tanh",
        )
        return problems

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def num_params(self, vocab_size: int, include_embeddings: bool = True) -> int:
        d, layers = self.d_model, self.n_layer
        bias = 1 if self.bias else 0
        per_layer = (
            4 * d * d
            + 4 * d * bias  # attention: qkv and output projection
            + 2 * self.mlp_ratio * d * d
            + (self.mlp_ratio + 1) * d * bias  # MLP
            + 4 * d  # two LayerNorms
        )
        total = layers * per_layer + (2 * d if self.norm == "pre" else 0)
        if include_embeddings:
            total += vocab_size * d + self.max_seq_len * d
        return total

    def flops_per_token(self, vocab_size: int, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B: 6N + 12 L T d."""
        dense = self.num_params(vocab_size, include_embeddings=False) + vocab_size * self.d_model
        return 6.0 * dense + 12.0 * self.n_layer * seq_len * self.d_model


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.residual_scaled = True  # type: ignore[assignment]  # GPT-2 init: see GPT._init_weights
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)  # (B, nh, past + T, hs)
            v = torch.cat([cache[1], v], dim=2)
        dropout = self.dropout if self.training else 0.0
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        elif cache is not None and T > 1:
            # Prefill after a cache: query i sees every cached key and the new keys up to i.
            past = k.shape[2] - T
            causal = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, dropout_p=dropout)
        else:
            # is_causal lets the kernel skip masked blocks (flash attention on GPUs).
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=cache is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=config.bias)
        self.proj.residual_scaled = True  # type: ignore[assignment]
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        if self.pre_norm:
            attended, cache = self.attn(self.ln_1(x), mask, cache)
            x = x + attended
            return x + self.mlp(self.ln_2(x)), cache
        attended, cache = self.attn(x, mask, cache)
        x = self.ln_1(x + attended)
        return self.ln_2(x + self.mlp(x)), cache


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention mask that also blocks attention across documents: (B, T) ids -> (B, 1, T, T) bool."""
    T = segment_ids.shape[1]
    same_document = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (same_document & causal).unsqueeze(1)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.vocab_size is not None, "vocab_size is resolved from the manifest before building"
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # Post-LN models end on a normalized residual already; pre-LN ones need a final LayerNorm.
        self.ln_f = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
            if config.norm == "pre"
            else nn.Identity()
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input and output embeddings
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), so the residual stream's variance
            # does not grow with depth (https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf, 2.3).
            if getattr(module, "residual_scaled", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def embed(self, input_ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = input_ids.shape[1]
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.config.max_seq_len}")
        positions = torch.arange(start, start + T, device=input_ids.device)
        return self.drop(self.wte(input_ids) + self.wpe(positions))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits (B, T, vocab) without targets; with targets, the cross-entropy loss (`reduction`)."""
        mask = document_mask(segment_ids) if segment_ids is not None and self.config.doc_mask else None
        x = self.embed(input_ids)
        for block in self.blocks:
            x, _ = block(x, mask)
        logits = self.head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)

    @torch.no_grad()
    def forward_cached(
        self, input_ids: torch.Tensor, caches: list[KVCache] | None, start: int
    ) -> tuple[torch.Tensor, list[KVCache]]:
        """Incremental decoding: logits of the new tokens and the updated per-layer key/value caches."""
        x = self.embed(input_ids, start)
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, None, caches[i] if caches is not None else None)
            new_caches.append(cache)
        return self.head(x), new_caches
