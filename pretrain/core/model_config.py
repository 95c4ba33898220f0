"""The shape of the GPT (`model=<preset>` picks conf/model/<preset>.yaml): a plain dataclass with no torch import,
so run configs load and validate without it."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigProblems


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
