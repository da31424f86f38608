"""The chain's attention calls on the CPU: grouped-query sdpa without expanded key/value copies and one additive mask
per pass, held to transformers' own sdpa function (which expands the heads and converts the mask in the kernel)."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

from engine_inputs import SampleSpec, make_batch
from ivtlr import IVTLR
from ivtlr.method.attention_rows import additive_mask_on_cpu, grouped_query_sdpa
from ivtlr.testing import FAMILIES, build_tiny


class _Module(torch.nn.Module):
    """What the attention functions read from an attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.scaling = groups, True, 0.25


def _chunk_mask(batch: int, q_length: int, kv_length: int, padded: int) -> torch.Tensor:
    """The mask of a chunk appended to a cache (queries at the end, causal), the last ``padded`` keys of sample 1
    being padding."""
    keys = torch.ones(batch, kv_length, dtype=torch.bool)
    keys[-1, kv_length - padded:] = False
    return sdpa_mask(batch_size=batch, q_length=q_length, kv_length=kv_length, q_offset=kv_length - q_length,
                     mask_function=causal_mask_function, attention_mask=keys, allow_is_causal_skip=False)


def _attention_with_grads(function, module, q, k, v, mask):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, _ = function(module, q, k, v, mask, scaling=module.scaling)
    out.square().sum().backward()
    return out.detach(), [t.grad for t in (q, k, v)]


def test_grouped_query_sdpa_equals_transformers_expanded_heads():
    torch.manual_seed(0)
    module = _Module(groups=4)
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    mask = _chunk_mask(2, 5, 12, padded=3)
    got, got_grads = _attention_with_grads(grouped_query_sdpa, module, q, k, v, mask)
    want, want_grads = _attention_with_grads(sdpa_attention_forward, module, q, k, v, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_grouped_query_sdpa_leaves_other_calls_to_transformers():
    module, q, k = _Module(groups=4), torch.randn(1, 8, 3, 16), torch.randn(1, 2, 3, 16)
    assert grouped_query_sdpa(module, q, k, k, None) is None  # unmasked: transformers passes enable_gqa itself
    assert grouped_query_sdpa(_Module(groups=1), q, q, q, _chunk_mask(2, 3, 3, 0)) is None
    assert grouped_query_sdpa(module, q, k, k, _chunk_mask(2, 3, 3, 0), softcap=30.0) is None


def test_additive_mask_attends_exactly_where_the_boolean_one_does():
    torch.manual_seed(0)
    mask = _chunk_mask(2, 4, 9, padded=2)
    additive = additive_mask_on_cpu(sdpa_mask)(batch_size=2, q_length=4, kv_length=9, q_offset=5,
                                               mask_function=causal_mask_function,
                                               attention_mask=torch.tensor([[True] * 9, [True] * 7 + [False] * 2]),
                                               allow_is_causal_skip=False, dtype=torch.float32)
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, mask) and bool(torch.isneginf(additive[~mask]).all())
    q, k = torch.randn(2, 4, 4, 8), torch.randn(2, 4, 9, 8)
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=additive),
                               torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_chain_never_expands_key_value_heads(family):
    """Every sdpa call of a cached training step gets the key/value heads as the model has them: no expanded copies
    saved per chunk for the backward pass."""
    bundle = build_tiny(family, num_heads=4, num_kv_heads=2)
    engine = IVTLR(bundle.model, bundle.latent_token_id, num_selected_patches=4)
    batch = make_batch(bundle, [SampleSpec("How many dots?", n_latent=2),
                                SampleSpec("Which digit is it?", n_latent=1, seed=1)])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, record_function("step"):
        engine(**batch).loss.backward()
    text = bundle.model.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    key_heads = [e.input_shapes[1][1] for e in prof.events() if e.name == "aten::scaled_dot_product_attention"
                 and len(e.input_shapes) > 1 and e.input_shapes[1][-1:] == [head_dim]
                 and e.input_shapes[0][1] == text.num_attention_heads]
    assert key_heads and set(key_heads) == {text.num_key_value_heads}
