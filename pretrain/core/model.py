"""The GPT causal transformer: a plain single-device `nn.Module`, readable top to bottom.

GPT-2 (Radford et al., 2019) by default: pre-LayerNorm blocks and a final LayerNorm. The original GPT
(Radford et al., 2018) with `norm="post"`: LayerNorm after each residual addition, no final LayerNorm.
Token and learned position embeddings, causal self-attention through `scaled_dot_product_attention` (flash
attention on GPUs), a GELU MLP, input and output embeddings tied, GPT-2 initialisation.

Parallelism never appears here: DeepSpeed wraps this module in `pretrain/core/engine.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.core.model_config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]


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


def embedding_layers(config: ModelConfig) -> tuple[nn.Embedding, nn.Embedding, nn.Dropout]:
    """Token embedding (tied to the output head), learned positions, embedding dropout."""
    assert config.vocab_size is not None, "vocab_size is resolved from the dataset before a model is built"
    return (
        nn.Embedding(config.vocab_size, config.d_model),
        nn.Embedding(config.max_seq_len, config.d_model),
        nn.Dropout(config.dropout),
    )


def final_norm(config: ModelConfig) -> nn.Module:
    # Post-LN models end on a normalized residual already; pre-LN ones need a final LayerNorm.
    if config.norm == "pre":
        return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
    return nn.Identity()


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte, self.wpe, self.drop = embedding_layers(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = final_norm(config)
        self.lm_head = nn.Linear(config.d_model, self.wte.num_embeddings, bias=False)
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
