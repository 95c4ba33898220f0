"""`python -m pretrain.generate run_dir=RUN prompt="..."`: sample text from a checkpoint, in one process.

Works on checkpoints of any ZeRO stage and pipeline layout (pretrain/core/trained_model.py), on CPU or GPU. Decoding uses the model's
key/value cache, so each new token costs one position of attention, not a pass over the whole context.
Text streams to the terminal as it is generated.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore

from common.app import run_app
from common.errors import ConfigProblems, UserError
from pretrain.core.model import GPT


@dataclass
class GenerateConfig:
    # A run directory (its latest complete checkpoint is used) or an explicit checkpoint directory.
    run_dir: str | None = None
    checkpoint: str | None = None
    prompt: str = ""
    # More prompts: a text file with one prompt per line.
    prompts_file: str | None = None
    max_new_tokens: int = 100
    # 0 means greedy decoding.
    temperature: float = 0.8
    # Keep only the k most likely tokens (0: all).
    top_k: int = 50
    # Keep the smallest set of tokens whose probability reaches top_p (1.0: all).
    top_p: float = 0.95
    seed: int = 0
    stop_at_eos: bool = True
    use_cache: bool = True
    # "auto": CUDA when available, else CPU.
    device: str = "auto"
    stream: bool = True

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be >= 1")
        problems.check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0: greedy)")
        problems.check(self.top_k >= 0, "top_k", self.top_k, "must be >= 0 (0: no limit)")
        problems.check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        return problems


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k and nucleus (top-p) sampling exclude; logits (B, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, config: GenerateConfig, generator: torch.Generator) -> torch.Tensor:
    if config.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits / config.temperature, config.top_k, config.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate_ids(model: GPT, prompt_ids: list[int], config: GenerateConfig, eos_id: int, on_token=None) -> list[int]:
    """Token ids generated after `prompt_ids` (not including them)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    limit = model.config.max_seq_len
    context = prompt_ids[-limit:]
    generated: list[int] = []
    caches = None
    logits, caches = model.forward_cached(torch.tensor([context], device=device), None, 0)
    for _ in range(config.max_new_tokens):
        token = next_token(logits[:, -1, :].float(), config, generator)
        value = int(token.item())
        if config.stop_at_eos and value == eos_id:
            break
        generated.append(value)
        if on_token is not None:
            on_token(generated)
        context.append(value)
        if not config.use_cache or len(context) >= limit:
            # Without a cache (or once the context is full, sliding the window), run the whole context.
            context = context[-(limit - 1) :] if len(context) >= limit else context
            logits, caches = model.forward_cached(torch.tensor([context], device=device), None, 0)
        else:
            logits, caches = model.forward_cached(token.view(1, 1), caches, len(context) - 1)
    return generated


def run(config: GenerateConfig) -> int:
    from pretrain.core.trained_model import load_trained_model

    config.problems().raise_if_any()
    loaded = load_trained_model(config.run_dir, config.checkpoint, config.device)
    prompts = [config.prompt] if config.prompt or not config.prompts_file else []
    if config.prompts_file:
        path = Path(config.prompts_file)
        if not path.is_file():
            raise UserError(f"prompts_file={config.prompts_file!r} not found")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_id
    print(
        f"# checkpoint {loaded.checkpoint.path} (step {loaded.state['trainer']['step']})", file=sys.stderr, flush=True
    )
    for prompt in prompts:
        # Documents begin after EOS in training, so a prompt is the start of a new document.
        prompt_ids = [eos, *tokenizer.encode(prompt)]
        shown = 0
        sys.stdout.write(prompt)

        def stream(generated: list[int]) -> None:
            nonlocal shown
            text = tokenizer.decode(generated)
            # Hold back a trailing replacement character: a multi-byte character may still be incomplete.
            safe = len(text.rstrip("\ufffd"))
            if config.stream and safe > shown:
                sys.stdout.write(text[shown:safe])
                sys.stdout.flush()
                shown = safe

        generated = generate_ids(loaded.model, prompt_ids, config, eos, stream)
        text = tokenizer.decode(generated)
        sys.stdout.write(text[shown:] + "\n")
        sys.stdout.flush()
    return 0


def main() -> None:
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
    run_app("generate", run)


if __name__ == "__main__":
    main()
