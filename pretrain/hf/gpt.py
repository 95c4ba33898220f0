"""Our GPT and transformers' GPT classes: the shape and the weight names, one table both directions use.

Which transformers class computes exactly our model:
- pre-LN (GPT-2) <-> `GPT2LMHeadModel`; our "gelu_tanh" is torch's tanh GELU, exported as "gelu_pytorch_tanh"
  (the very kernel our model calls); "gelu_new" is the same formula written out in Python ops (it differs by
  ~5e-7) and imports as gelu_tanh; "gelu" is the exact erf form both sides;
- post-LN (original GPT) <-> `OpenAIGPTLMHeadModel`: `ln_1(x + attn(x))`, `ln_2(n + mlp(n))`, no final norm, as
  our Block with norm="post". Its afn "gelu" is the tanh approximation (transformers maps it to gelu_new); it has
  no exact-erf GELU and its MLP is fixed at 4 x d_model.
Both store linear weights as `Conv1D` (in, out): ours (out, in) are transposed. The head is tied to the token
embedding on both sides. What a class can do that ours cannot (another activation, attention scaled by layer,
an untied head, cross-attention...) is refused when importing, naming the key: nothing is approximated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from common.errors import ConfigProblems, UserError
from pretrain.core.model_config import ModelConfig

GPT2, OPENAI_GPT = "GPT2LMHeadModel", "OpenAIGPTLMHeadModel"
# transformers' activation names -> ours (GPT-2's activation_function; OpenAIGPT's afn "gelu" is gelu_new).
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# Our Linear modules -> transformers' Conv1D modules, per block.
LINEARS = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
# Non-persistent buffers older transformers versions saved with GPT-2 (the causal mask): not weights.
BUFFERS = (".attn.bias", ".attn.masked_bias")
# What export and import check a conversion on: real text with the cases tokenizers get wrong (accents, CJK,
# emoji, digits, runs of spaces, tabs, newlines).
PROBE_TEXT = (
    "It was the best of times, it was the worst of times; the year 1775 had 365 days.\n\n"
    "  Indented   with\tspaces and\t\ttabs — café, naïve, 你好, 😀!\n"
)


@torch.no_grad()
def max_logit_difference(theirs: Any, ours: torch.nn.Module, ids: torch.Tensor) -> float:
    """Largest |logit difference| between a transformers causal LM and our model on the same ids."""
    return float((theirs(ids, attention_mask=torch.ones_like(ids)).logits - ours(ids)).abs().max())


def architecture(config: ModelConfig) -> str:
    return OPENAI_GPT if config.norm == "post" else GPT2


def weight_table(config: ModelConfig) -> Iterator[tuple[str, str, bool]]:
    """(our name, transformers' name, transposed) of every weight and bias, the tied head once."""
    post = config.norm == "post"
    embeddings = ("tokens_embed", "positions_embed") if post else ("wte", "wpe")
    yield "wte.weight", f"transformer.{embeddings[0]}.weight", False
    yield "wpe.weight", f"transformer.{embeddings[1]}.weight", False
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for mine, conv in LINEARS.items():
            yield f"{ours}{mine}.weight", f"{theirs}{conv}.weight", True  # Conv1D: (in, out)
            yield f"{ours}{mine}.bias", f"{theirs}{conv}.bias", False
        for norm in ("ln_1", "ln_2"):
            yield f"{ours}{norm}.weight", f"{theirs}{norm}.weight", False
            yield f"{ours}{norm}.bias", f"{theirs}{norm}.bias", False
    if not post:
        yield "ln_f.weight", "transformer.ln_f.weight", False
        yield "ln_f.bias", "transformer.ln_f.bias", False


def to_hf(config: ModelConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, fp32. Without biases (bias=false) they are exported as zeros,
    which compute the same function; the tied head is stored once, as transformers saves tied weights."""
    out = {}
    for mine, theirs, transposed in weight_table(config):
        if mine in ours:
            out[theirs] = ours[mine].t() if transposed else ours[mine]
        else:  # a bias of a bias=false model: zeros of the weight's output size
            weight = ours[mine.rsplit(".", 1)[0] + ".weight"]
            out[theirs] = torch.zeros(weight.shape[0])
    return {name: tensor.detach().float().contiguous() for name, tensor in out.items()}


def from_hf(config: ModelConfig, theirs: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """transformers' weights (with or without the `transformer.` prefix: GPT2Model's own files lack it) under our
    names, fp32. Refuses a missing or unexpected weight and a head not tied to the token embedding."""
    named = {}
    for name, tensor in theirs.items():
        if name.endswith(BUFFERS):
            continue
        named[name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"] = tensor
    head = named.pop("lm_head.weight", None)
    out, used = {}, set()
    for mine, hf_name, transposed in weight_table(config):
        if hf_name not in named:
            raise UserError(f"{where} has no weight {hf_name}: not a complete {architecture(config)}")
        tensor = named[hf_name]
        out[mine] = (tensor.t() if transposed else tensor).float().contiguous()
        used.add(hf_name)
    unexpected = sorted(set(named) - used)
    if unexpected:
        raise UserError(f"{where} has weights {architecture(config)} does not: {', '.join(unexpected[:5])}")
    if head is not None and not torch.equal(head.float(), out["wte.weight"]):
        raise UserError(f"{where}: lm_head.weight differs from the token embedding (an untied head); ours is tied")
    return out


def hf_config(config: ModelConfig, specials: dict[str, int], dtype: str) -> Any:
    """The transformers config object (GPT2Config or OpenAIGPTConfig) of our model's shape."""
    from transformers import GPT2Config, OpenAIGPTConfig

    common: dict[str, Any] = {
        "vocab_size": config.vocab_size,
        "n_positions": config.max_seq_len,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "initializer_range": config.init_std,
        "tie_word_embeddings": True,
        "dtype": dtype,
        **specials,
    }
    if config.norm == "post":
        return OpenAIGPTConfig(**common, afn="gelu", architectures=[OPENAI_GPT])
    activation = "gelu_pytorch_tanh" if config.activation == "gelu_tanh" else "gelu"
    return GPT2Config(
        **common,
        n_inner=config.mlp_ratio * config.d_model,
        activation_function=activation,
        scale_attn_weights=True,
        architectures=[GPT2],
    )


def export_problems(config: ModelConfig) -> ConfigProblems:
    """What transformers' GPT classes cannot compute exactly, each naming the setting and why."""
    problems = ConfigProblems()
    if config.norm == "post" and config.activation != "gelu_tanh":
        problems.add(
            "model.activation",
            config.activation,
            "post-LN models export as OpenAIGPTLMHeadModel, whose GELU is the tanh approximation; "
            "train with model.activation=gelu_tanh (the original GPT's) to export",
        )
    if config.norm == "post" and config.mlp_ratio != 4:
        problems.add("model.mlp_ratio", config.mlp_ratio, "OpenAIGPTLMHeadModel's MLP is fixed at 4 x d_model")
    return problems


def _dropout(raw: dict[str, Any], keys: tuple[str, ...], where: str) -> float:
    values = {key: float(raw.get(key, 0.1)) for key in keys}
    if len(set(values.values())) > 1:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        raise UserError(f"{where}: {shown}; our model has one dropout: give it with dropout=P")
    return next(iter(values.values()))


def model_config_from_hf(raw: dict[str, Any], where: str, dropout: float | None = None) -> ModelConfig:
    """Our model's shape from a transformers config.json (as a dict); one line naming the first key that our model
    cannot compute exactly. `dropout`: instead of the config's (our model has one rate for all three)."""
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    kind = GPT2 if model_type == "gpt2" else OPENAI_GPT if model_type == "openai-gpt" else None
    if kind is None or any(a not in (GPT2, OPENAI_GPT, "GPT2Model", "OpenAIGPTModel") for a in architectures):
        raise UserError(
            f"{where}: model_type={model_type!r} architectures={architectures}; import takes GPT2LMHeadModel or "
            "OpenAIGPTLMHeadModel"
        )

    def refuse(key: str, why: str) -> UserError:
        return UserError(f"{where}: {key}={raw.get(key)!r} cannot be imported exactly: {why}")

    d_model = int(raw["n_embd"])
    if not raw.get("tie_word_embeddings", True):
        raise refuse("tie_word_embeddings", "our head is tied to the token embedding")
    if raw.get("add_cross_attention"):
        raise refuse("add_cross_attention", "our model is a decoder without cross-attention")
    dropouts = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
    if kind == OPENAI_GPT:
        if raw.get("afn", "gelu") != "gelu":
            raise refuse("afn", "our activations are GELU (transformers' OpenAIGPT 'gelu' is the tanh form)")
        activation, mlp_ratio, norm = "gelu_tanh", 4, "post"
    else:
        name = raw.get("activation_function", "gelu_new")
        if name not in GPT2_ACTIVATIONS:
            raise refuse("activation_function", f"ours are {', '.join(GPT2_ACTIVATIONS)}")
        if not raw.get("scale_attn_weights", True):
            raise refuse("scale_attn_weights", "our attention always scales by 1/sqrt(head_dim)")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if raw.get(key):
                raise refuse(key, "our attention does not do this")
        inner = raw.get("n_inner") or 4 * d_model
        if inner % d_model:
            raise refuse("n_inner", f"our MLP width is a whole multiple of n_embd ({d_model})")
        activation, mlp_ratio, norm = GPT2_ACTIVATIONS[name], int(inner) // d_model, "pre"
    return ModelConfig(
        name=str(raw.get("_name_or_path") or model_type),
        vocab_size=int(raw["vocab_size"]),
        n_layer=int(raw["n_layer"]),
        n_head=int(raw["n_head"]),
        d_model=d_model,
        max_seq_len=int(raw["n_positions"]),
        dropout=_dropout(raw, dropouts, where) if dropout is None else dropout,
        norm=norm,
        activation=activation,
        mlp_ratio=mlp_ratio,
        bias=True,
        layer_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        init_std=float(raw.get("initializer_range", 0.02)),
    )
