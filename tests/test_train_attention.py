"""train.attention: the causal-attention backward built from batched matmuls gives flash's gradients to bf16
precision (against an fp32 reference), and the model takes it only for plain causal bf16 training passes; masked,
packed and no-grad passes keep transformers' SDPA, with the same results."""

from __future__ import annotations

import math

import pytest
import torch

from collegeadvisor.train.attention import ATTENTION, attention_backward, causal_attention, takes_fast_path
from collegeadvisor.train.batching import collate, collate_packed
from test_speed_paths import encoded_rows
from test_train_fused import build, loss_and_grads

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def rel(got, want) -> float:
    return float((got.float() - want).norm() / want.norm())


@pytest.mark.parametrize("length,block,heads,kv_heads,dim", [
    (200, 64, 6, 2, 64),   # several blocks, the last one short; GQA 3:1; scale 1/8 exact in bf16
    (37, 16, 4, 4, 48),    # no GQA; scale 1/sqrt(48), not a power of two
    (64, 128, 9, 3, 64),   # one block longer than the sequence (SmolLM2's heads)
])
def test_backward_matches_an_fp32_reference_as_closely_as_flash(length, block, heads, kv_heads, dim):
    torch.manual_seed(0)
    q = torch.randn(2, heads, length, dim).to(torch.bfloat16)
    k, v = (torch.randn(2, kv_heads, length, dim).to(torch.bfloat16) for _ in range(2))
    grad_out = torch.randn_like(q)
    scale = 1 / math.sqrt(dim)
    out, lse = FLASH(q, k, v, 0.0, True, scale=scale)[:2]
    ref = [t.float().requires_grad_() for t in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=True, scale=scale,
                                                      enable_gqa=True).backward(grad_out.float())
    got = attention_backward(grad_out, q, k, v, out, lse, scale, block=block)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, q, k, v, out, lse, 0.0,
                                                                                True, scale=scale)
    for g, f, r in zip(got, flash, ref):
        assert g.shape == r.shape and g.dtype == torch.bfloat16
        assert rel(g, r.grad) < 0.012  # flash itself: 0.003-0.006 here; bf16's own rounding is 0.004
        assert rel(g, r.grad) < 3 * rel(f, r.grad)


def test_no_key_past_the_query_gets_a_gradient_from_it():
    """Causality: the gradient of the first query's output reaches key 0 and value 0 only."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 150, 64).to(torch.bfloat16) for _ in range(3))
    out, lse = FLASH(q, k, v, 0.0, True)[:2]
    grad_out = torch.zeros_like(q)
    grad_out[:, :, 0] = 1
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, 0.125, block=64)
    assert float(dv[:, :, 1:].abs().max()) == 0 and float(dk[:, :, 1:].abs().max()) == 0
    assert float(dv[:, :, 0].abs().min()) > 0 and float(dq[:, :, 1:].abs().max()) == 0


def qkv(requires_grad=True, dtype=torch.bfloat16):
    torch.manual_seed(2)
    q = torch.randn(2, 4, 20, 8, dtype=dtype, requires_grad=requires_grad)
    k, v = (torch.randn(2, 2, 20, 8, dtype=dtype, requires_grad=requires_grad) for _ in range(2))
    return q, k, v


def test_the_fast_path_is_only_for_plain_causal_bf16_training_passes():
    q, k, v = qkv()
    assert takes_fast_path(q, k, v, None, 0.0, True, {})
    assert not takes_fast_path(q, k, v, torch.ones(2, 1, 20, 20, dtype=torch.bool), 0.0, True, {})  # a mask
    assert not takes_fast_path(q, k, v, None, 0.1, True, {})  # dropout
    assert not takes_fast_path(q, k, v, None, 0.0, False, {})  # not causal
    assert not takes_fast_path(q, k, v, None, 0.0, True, {"sliding_window": 4})
    assert not takes_fast_path(q, k[:, :, :5], v[:, :, :5], None, 0.0, True, {})  # a cache's keys
    assert not takes_fast_path(*qkv(dtype=torch.float32), None, 0.0, True, {})
    assert not takes_fast_path(*qkv(requires_grad=False), None, 0.0, True, {})
    frozen_q = qkv()[0].detach()
    assert takes_fast_path(frozen_q, k, v, None, 0.0, True, {})  # LoRA on k and v only: still a training pass
    with torch.no_grad():
        assert not takes_fast_path(q, k, v, None, 0.0, True, {})


def test_causal_attention_gives_sdpa_s_output_and_layout():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q, k, v = qkv()
    got, _ = causal_attention(module, q, k, v, None, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    assert got.shape == want.shape == (2, 20, 4, 8)
    assert torch.equal(got, want)  # the same flash forward
    assert "_CausalAttentionFnBackward" in graph_nodes(got.grad_fn)
    assert "_CausalAttentionFnBackward" not in graph_nodes(want.grad_fn)


def graph_nodes(fn, seen=None) -> set[str]:
    """Names of the autograd nodes reachable from fn."""
    seen = set() if seen is None else seen
    if fn is not None and type(fn).__name__ not in seen:
        seen.add(type(fn).__name__)
        for nxt, _ in fn.next_functions:
            graph_nodes(nxt, seen)
    return seen


def test_the_model_trains_through_it_with_sdpa_s_loss_and_gradients(tinyllama_tiny_model, tinyllama_tokenizer,
                                                                      monkeypatch):
    from collegeadvisor.config import load_config

    batch = collate(encoded_rows(tinyllama_tokenizer, 4), tinyllama_tokenizer.pad_token_id)
    calls = []
    import collegeadvisor.train.attention as attention

    real = attention.attention_backward
    monkeypatch.setattr(attention, "attention_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = {}
    for on in (False, True):
        real_load = load_config
        monkeypatch.setattr("test_train_fused.load_config",
                            lambda path, over: real_load(path, {**over, "fused_attention": on}))
        results[on] = loss_and_grads(tinyllama_tiny_model, batch, fused=True, bf16=True)
    assert len(calls) == 2  # both layers' backward ran here, and only with the setting on
    (want_loss, want), (got_loss, got) = results[False], results[True]
    assert got_loss == pytest.approx(want_loss, rel=1e-6)  # the forward is flash's own
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=0)) >= 0.999
    assert float(got.norm()) == pytest.approx(float(want.norm()), rel=0.01)


def test_masked_packed_and_generating_passes_keep_sdpa_s_results(tinyllama_tiny_model, tinyllama_tokenizer):
    on = build(tinyllama_tiny_model, fused=True, dropout=0.0, bf16=True)
    base = on.model.get_base_model()
    assert base.config._attn_implementation == ATTENTION
    rows = encoded_rows(tinyllama_tokenizer, 3)
    padded = collate(rows, tinyllama_tokenizer.pad_token_id)
    left = dict(padded, attention_mask=padded["attention_mask"].flip(1), input_ids=padded["input_ids"].flip(1),
                labels=padded["labels"].flip(1))  # left-padded: the mask must be built and applied
    packed = collate_packed([rows[:2], rows[2:]], tinyllama_tokenizer.pad_token_id)
    prompt = padded["input_ids"][:1, :12]
    got = {}
    for impl in (ATTENTION, "sdpa"):
        base.set_attn_implementation(impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got[impl] = [float(on(**left)), float(on(**packed))]
        with torch.no_grad():
            got[impl].append(base.generate(prompt, max_new_tokens=6, do_sample=False).tolist())
    assert got[ATTENTION] == got["sdpa"]


def test_attention_keeps_one_copy_of_its_output_with_the_output_projection(tinyllama_tiny_model,
                                                                             tinyllama_tokenizer):
    """Flash's output takes the layout of the model's queries (a (B, L, H, D) tensor seen as (B, H, L, D)), so the
    output projection reads it without a copy, and the tensor the attention node saves is the one the
    projection's LoRA node saves as its input: one copy a layer for backward, not two."""
    loss_module = build(tinyllama_tiny_model, fused=True, dropout=0.0, bf16=True)
    batch = collate(encoded_rows(tinyllama_tokenizer, 2), tinyllama_tokenizer.pad_token_id)
    projected = []
    o_projs = [m for name, m in loss_module.model.named_modules() if name.endswith("o_proj")]
    hooks = [m.register_forward_pre_hook(lambda m, args: projected.append(args[0])) for m in o_projs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_module(**batch)
    for h in hooks:
        h.remove()
    outputs, seen, todo = [], set(), [loss.grad_fn]
    while todo:  # the attention nodes of the graph, and the output each saved
        fn = todo.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if type(fn).__name__ == "_CausalAttentionFnBackward":
            outputs.append(fn.saved_tensors[3])
        todo += [nxt for nxt, _ in fn.next_functions]
    assert len(outputs) == len(o_projs) == 2
    assert {o.untyped_storage().data_ptr() for o in outputs} == {x.untyped_storage().data_ptr() for x in projected}
    loss.backward()  # and backward runs from the saved layout
