"""The single-device model: shapes, tying, initialisation, document masking, KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.core.model import GPT
from pretrain.core.model_config import ModelConfig
from pretrain.generate import GenerateConfig, generate_ids


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=97, n_layer=3, n_head=4, d_model=32, max_seq_len=64, **overrides)).eval()


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_forward_shapes_and_loss(norm: str) -> None:
    model = tiny(norm=norm)
    ids = torch.randint(0, 97, (2, 16))
    assert model(ids).shape == (2, 16, 97)
    loss = model(ids[:, :-1], ids[:, 1:])
    # Untrained, the loss is close to log(vocab): the initialisation is sane.
    assert abs(float(loss.detach()) - math.log(97)) < 0.5
    assert model(ids[:, :-1], ids[:, 1:], reduction="none").shape == (2 * 15,)


def test_embeddings_are_tied_and_counted_once() -> None:
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    counted = sum(p.numel() for p in model.parameters())
    assert counted == model.config.num_params(97)


def test_residual_projections_use_scaled_init() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=8, n_head=4, d_model=256, max_seq_len=16))
    expected = 0.02 / math.sqrt(2 * 8)
    assert abs(float(model.blocks[0].attn.proj.weight.detach().std()) - expected) < 0.1 * expected
    assert abs(float(model.blocks[0].mlp.proj.weight.detach().std()) - expected) < 0.1 * expected
    assert abs(float(model.blocks[0].mlp.fc.weight.detach().std()) - 0.02) < 0.002


def test_document_mask_isolates_documents() -> None:
    model = tiny(doc_mask=True)
    ids = torch.randint(0, 97, (1, 12))
    segments = torch.tensor([[0] * 5 + [1] * 7])
    changed = ids.clone()
    changed[0, :5] = (changed[0, :5] + 1) % 97  # a different first document
    with torch.no_grad():
        before = model(ids, segment_ids=segments)
        after = model(changed, segment_ids=segments)
        unmasked = tiny(doc_mask=False)(changed, segment_ids=segments)
    assert torch.allclose(before[0, 5:], after[0, 5:], atol=1e-6)  # the second document cannot see the first
    assert not torch.allclose(before[0, :5], after[0, :5])
    assert not torch.allclose(unmasked[0, 5:], after[0, 5:])


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_kv_cache_gives_the_same_greedy_tokens(norm: str) -> None:
    model = tiny(norm=norm)
    prompt = torch.randint(0, 97, (7,)).tolist()
    cached = generate_ids(model, prompt, GenerateConfig(max_new_tokens=30, temperature=0, stop_at_eos=False), 2)
    uncached = generate_ids(
        model, prompt, GenerateConfig(max_new_tokens=30, temperature=0, stop_at_eos=False, use_cache=False), 2
    )
    assert cached == uncached and len(cached) == 30


def test_cached_logits_equal_full_forward() -> None:
    model = tiny()
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full = model(ids)
        first, caches = model.forward_cached(ids[:, :12], None, 0)
        rest = [model.forward_cached(ids[:, i : i + 1], caches, i)[0] for i in range(12, 13)]
        prefill, _ = model.forward_cached(ids[:, 12:], caches, 12)
    assert torch.allclose(first, full[:, :12], atol=1e-5)
    assert torch.allclose(rest[0], full[:, 12:13], atol=1e-5)
    assert torch.allclose(prefill, full[:, 12:], atol=1e-5)


def test_flops_per_token_follows_6n_rule() -> None:
    config = ModelConfig(vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024)
    non_embedding = config.num_params(50257, include_embeddings=False)
    assert 84e6 < non_embedding < 86e6  # GPT-2 small: 85 M parameters outside the embeddings
    flops = config.flops_per_token(50257, 1024)
    assert flops == 6 * (non_embedding + 50257 * 768) + 12 * 12 * 1024 * 768
