"""The fused training kernels (train.fused) give the loss and gradients of the plain path: peft's LoRA layers and
transformers' output layer with cross-entropy. Compared on the same model, batch and dropout masks, in fp32 (the
same sums in another order) and in the bf16 path (frozen base in bf16 + autocast, LoRA in fp32), where both sides
round to bf16 at slightly different points."""

from __future__ import annotations

import pytest
import torch

from collegeadvisor.config import load_config
from collegeadvisor.train import recipe
from collegeadvisor.train.batching import collate
from collegeadvisor.train.fused import fuse_kernels, linear_cross_entropy, recomputed_layers
from test_speed_paths import encoded_rows, lora_grads

FP32_REL = 1e-5


def build(path, fused: bool, dropout: float, bf16: bool, recompute: float = 1.0, **settings):
    """The recipe's own model (lora_model, keep_base_in_bf16) with B set to small random values (peft starts B at
    zero, which leaves A without a gradient), seeded the same for both paths; settings: more Config fields."""
    from collegeadvisor.models import load_model

    cfg = load_config(None, {"lora_r": 8, "lora_alpha": 16, "lora_dropout": dropout, "fused": fused,
                             "recompute_mlp": recompute, **settings})
    torch.manual_seed(0)
    model = recipe.lora_model(load_model(str(path), dtype=torch.float32), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    if bf16:
        recipe.keep_base_in_bf16(model)
    model.train()
    return recipe.LabelLoss(model, fused=fused)


def loss_and_grads(path, batch, fused: bool, dropout: float = 0.0, bf16: bool = False, recompute: float = 1.0):
    loss_module = build(path, fused, dropout, bf16, recompute)
    torch.manual_seed(123)  # the dropout masks: drawn in the same order on both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_module(**batch)
    loss.backward()
    return float(loss), lora_grads(loss_module.model)


@pytest.mark.parametrize("recompute", [1.0, 0.0])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_path_matches_peft_in_fp32(tinyllama_tiny_model, tinyllama_tokenizer, dropout, recompute):
    batch = collate(encoded_rows(tinyllama_tokenizer, 4), tinyllama_tokenizer.pad_token_id)
    want_loss, want = loss_and_grads(tinyllama_tiny_model, batch, fused=False, dropout=dropout)
    got_loss, got = loss_and_grads(tinyllama_tiny_model, batch, fused=True, dropout=dropout, recompute=recompute)
    assert got_loss == pytest.approx(want_loss, rel=FP32_REL)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_fused_path_matches_peft_in_bf16(tinyllama_tiny_model, tinyllama_tokenizer):
    batch = collate(encoded_rows(tinyllama_tokenizer, 4), tinyllama_tokenizer.pad_token_id)
    want_loss, want = loss_and_grads(tinyllama_tiny_model, batch, fused=False, dropout=0.1, bf16=True)
    got_loss, got = loss_and_grads(tinyllama_tiny_model, batch, fused=True, dropout=0.1, bf16=True)
    assert got_loss == pytest.approx(want_loss, rel=5e-3)
    cosine = float(torch.nn.functional.cosine_similarity(got, want, dim=0))
    assert cosine >= 0.999
    assert float(got.norm()) == pytest.approx(float(want.norm()), rel=0.02)


def test_every_lora_layer_runs_fused_and_peft_paths_stay_for_the_rest(tinyllama_tiny_model, tinyllama_tokenizer):
    loss_module = build(tinyllama_tiny_model, fused=True, dropout=0.0, bf16=False)
    model = loss_module.model
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert lora_layers and all(hasattr(m, "_plain_forward") for m in lora_layers)
    assert fuse_kernels(model) == len(lora_layers)  # idempotent: no double wrapping
    batch = collate(encoded_rows(tinyllama_tokenizer, 2), tinyllama_tokenizer.pad_token_id)
    with torch.no_grad():
        on = float(loss_module(**batch))
        with model.disable_adapter():  # peft's own path: the base alone
            off = float(loss_module(**batch))
        base = recipe.LabelLoss(model.get_base_model(), fused=False)
        with model.disable_adapter():
            plain = float(base(**batch))
    assert off == pytest.approx(plain, rel=FP32_REL) and abs(on - off) > 1e-3


def test_linear_cross_entropy_matches_cross_entropy_and_keeps_no_logits():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(101, 16)
    targets = torch.randint(0, 101, (37,))
    want = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (want_grad,) = torch.autograd.grad(want * 0.5, hidden)
    got = linear_cross_entropy(hidden, weight, targets, chunk=8)  # 5 chunks, the last one short
    (got_grad,) = torch.autograd.grad(got * 0.5, hidden)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert torch.allclose(got_grad, want_grad, atol=1e-5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        linear_cross_entropy(hidden, weight, targets, chunk=8)
    assert saved == [hidden.shape]  # only the gradient w.r.t. the hidden states, never (tokens x vocabulary)


def test_fused_training_saves_less_for_backward(tinyllama_tiny_model, tinyllama_tokenizer):
    batch = collate(encoded_rows(tinyllama_tokenizer, 4), tinyllama_tokenizer.pad_token_id)
    sizes, vocab_wide = {}, {}
    for fused in (False, True):
        loss_module = build(tinyllama_tiny_model, fused, dropout=0.1, bf16=True)
        seen: dict[int, int] = {}

        vocab = loss_module.head.weight.shape[0]
        vocab_wide[fused] = 0

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            vocab_wide[fused] += t.dim() > 0 and t.shape[-1] == vocab and not t.requires_grad
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss_module(**batch)
        params = {p.untyped_storage().data_ptr() for p in loss_module.model.parameters()}
        sizes[fused] = sum(n for ptr, n in seen.items() if ptr not in params)
    assert vocab_wide[False] > 0 and vocab_wide[True] == 0  # the plain path keeps the logits for backward
    assert sizes[True] < 0.85 * sizes[False], sizes  # 0.81 on this model; 0.55 on SmolLM2 at 1 x 400


def test_a_run_with_fused_kernels_off_trains_the_same(tmp_path, tinyllama_tiny_model):
    from test_speed_paths import cfg_for, step_losses

    runs = {}
    for fused in (True, False):
        (tmp_path / str(fused)).mkdir()
        cfg = cfg_for(tmp_path / str(fused), tinyllama_tiny_model, fused=fused, max_steps=3)
        runs[fused] = step_losses(recipe.train(cfg, log=lambda *_: None))
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
    assert len(runs[True]) == 3


def test_the_gated_mlp_and_rms_norm_run_fused_only_where_their_forward_is_the_llama_one(tinyllama_tiny_model):
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    from collegeadvisor.train.fused import _computes_gated_mlp

    model = build(tinyllama_tiny_model, fused=True, dropout=0.0, bf16=False).model
    for kind in ("LlamaMLP", "LlamaRMSNorm"):
        routed = [m for m in model.modules() if type(m).__name__ == kind]
        assert routed and all(hasattr(m, "_plain_forward") for m in routed), kind
    assert not _computes_gated_mlp(Phi3MLP)  # gate and up fused in one projection: peft's path



def test_lora_layers_reading_a_norm_save_none_of_its_output(tinyllama_tiny_model, tinyllama_tokenizer, monkeypatch):
    """q/k/v and gate/up read a decoder layer's RMSNorm output; the fused path recomputes it in backward (the
    gradient tests above show it is the same), so none of those outputs is kept for backward. Without the
    recomputation each is kept."""
    from collegeadvisor.train import fused

    batch = collate(encoded_rows(tinyllama_tokenizer, 2), tinyllama_tokenizer.pad_token_id)
    kept = {}
    for recompute in (True, False):
        if not recompute:
            monkeypatch.setattr(fused._Normed, "of", staticmethod(lambda x: None))
        loss_module = build(tinyllama_tiny_model, fused=True, dropout=0.1, bf16=True)
        outputs, saved = [], set()  # the outputs are held, so no later tensor can reuse their memory
        norms = [m for name, m in loss_module.model.named_modules() if name.endswith("layernorm")]
        hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in norms]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.add(t.untyped_storage().data_ptr()) or t,
                                                      lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_module(**batch)
        for h in hooks:
            h.remove()
        loss.backward()  # the recomputation runs, once per norm, and frees its copy after the last reader
        kept[recompute] = len({o.untyped_storage().data_ptr() for o in outputs} & saved)
    assert len(norms) >= 4 and kept == {True: 0, False: len(norms)}, kept


def test_recompute_mlp_keeps_neither_gate_nor_up_and_gives_the_same_gradients(tinyllama_tiny_model,
                                                                               tinyllama_tokenizer):
    """recompute_mlp: backward recomputes the MLP's gate and up from its input in that share of the layers, so no
    tensor of the MLP's width is kept for backward there (in the others, gate and up: two a layer), and loss and
    gradients are the ones of the fused path that keeps them all, in the bf16 path with dropout (the same ops on
    the same values, the masks drawn in the same order)."""
    batch = collate(encoded_rows(tinyllama_tokenizer, 3), tinyllama_tokenizer.pad_token_id)
    wide, results = {}, {}
    shares = (1.0, 0.5, 0.0)
    for share in shares:
        loss_module = build(tinyllama_tiny_model, fused=True, dropout=0.1, bf16=True, recompute=share)
        width = loss_module.model.get_base_model().config.intermediate_size
        params = {p.untyped_storage().data_ptr() for p in loss_module.model.parameters()}
        kept = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in params and t.dim() == 3 and t.shape[-1] == width:
                kept.append((t.dtype, tuple(t.shape)))
            return t

        torch.manual_seed(123)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_module(**batch)
        loss.backward()
        wide[share] = [k for k in kept if k[0] != torch.bool]  # not down's dropout mask (bool): all keep it
        results[share] = (float(loss), lora_grads(loss_module.model))
    layers = build(tinyllama_tiny_model, True, 0.0, False).model.get_base_model().config.num_hidden_layers
    assert layers == 2
    assert {s: len(w) for s, w in wide.items()} == {1.0: 0, 0.5: 2, 0.0: 4}, wide
    for share in shares[:-1]:
        assert results[share][0] == results[0.0][0]
        assert torch.allclose(results[share][1], results[0.0][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("count, share, expected", [(30, 0.5, set(range(0, 30, 2))), (30, 1.0, set(range(30))),
                                                    (30, 0.0, set()), (4, 0.25, {0}), (3, 0.5, {0, 1}),
                                                    (22, 0.1, {0, 11})])
def test_recomputed_layers_take_the_share_spread_evenly(count, share, expected):
    assert recomputed_layers(count, share) == expected
