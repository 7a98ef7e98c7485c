"""Causal attention for LoRA training on CPU: torch's flash kernel forward, and a backward built from a few large
batched matmuls instead of the flash kernel's own.

torch's CPU flash-attention backward runs many small bf16 matmuls per (example, head) and costs 5-7x its forward
(SmolLM2, 4 x 512: 22 ms against 4 ms a layer; at 16 x 128 it is 28 ms against 3). This backward takes query
blocks of BLOCK rows and, for each, every key up to the block's end (the blocks above the diagonal are skipped),
with all heads of a key/value group in one batched matmul (GQA without repeating keys). The softmax
normalisation and the row term D = rowsum(dO * O) are folded into the matmuls as two extra columns, so the bf16
products come out already normalised and the elementwise work is one exp and one product per block:

    [q, -lse/scale] . [k, 1] = (q.k - lse/scale)          P = exp(scale * that)
    [dO, -D] . [v, 1]        = dP - D                      dS = P * (dP - D)

(-lse/scale and -D ride as two bf16 parts each, 16 bits, and the matmul accumulates in fp32, so the values near
0 that dominate P come out with bf16's relative precision.) Memory stays bounded: one block's (heads x BLOCK x
length) products at a time, and the node keeps what flash's own keeps (q, k, v, output, logsumexp).

`causal_attention` is registered with transformers' AttentionInterface (name ATTENTION) and takes this path for a
training pass on CPU in bf16 with no mask (right-padded batches run unmasked, see recipe.right_padded); anything
else (a mask, packed rows, dropout, a sliding window, generation) goes to transformers' own SDPA function."""

from __future__ import annotations

import math

import torch

ATTENTION = "collegeadvisor_sdpa"  # the name under transformers' AttentionInterface and AttentionMaskInterface
BLOCK = 128  # query rows per block: 96-192 measured within noise of each other at 128-512 tokens (SmolLM2 shapes)
EXTRA = 2  # folded columns: a value in two bf16 parts
# keyword arguments transformers may pass that change the computation; the fast path runs only when all are unset
_CHANGES_ATTENTION = ("softcap", "sliding_window", "position_bias", "s_aux", "output_attentions")


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x as two bf16 parts whose sum keeps 16 bits of it."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def _folded(x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """x (..., D) with EXTRA columns appended: extra's two bf16 parts (extra: fp32, x's shape without D), or ones."""
    out = x.new_empty(*x.shape[:-1], x.shape[-1] + EXTRA)
    out[..., : x.shape[-1]] = x
    if extra is None:
        out[..., x.shape[-1]:] = 1
    else:
        out[..., -2], out[..., -1] = _split(extra)
    return out


def attention_backward(grad_out, q, k, v, out, lse, scale: float, block: int = BLOCK):
    """(grad q, grad k, grad v) of causal softmax(scale q k^T) v, from flash's output and logsumexp. q, grad_out:
    (B, H, L, D); k, v: (B, Hk, L, D), H a multiple of Hk; all bf16; lse fp32 (B, H, L)."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    g = h // hk
    row = (grad_out.float() * out.float()).sum(-1)  # D = rowsum(dO * O)
    qa = _folded(q, -lse / scale).view(b * hk, g, n, d + EXTRA)
    ga = _folded(grad_out, -row).view(b * hk, g, n, d + EXTRA)
    ka = _folded(k, None).view(b * hk, n, d + EXTRA)
    va = _folded(v, None).view(b * hk, n, d + EXTRA)
    kk = k.reshape(b * hk, n, d)
    dq = q.new_empty(b * hk, g, n, d)
    dk = torch.zeros(b * hk, n, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    above = torch.ones(block, block, dtype=torch.bool, device=q.device).triu_(1)
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        m = i1 - i0
        qb = qa[:, :, i0:i1].reshape(b * hk, g * m, d + EXTRA)
        p = torch.bmm(qb, ka[:, :i1].transpose(1, 2)).mul_(scale).exp_()  # P, (b*hk, g*m, i1)
        p.view(b * hk, g, m, i1)[..., i0:i1].masked_fill_(above[:m, :m], 0)
        gb = ga[:, :, i0:i1].reshape(b * hk, g * m, d + EXTRA)
        dv[:, :i1] += torch.bmm(p.transpose(1, 2), gb[..., :d])
        ds = torch.bmm(gb, va[:, :i1].transpose(1, 2)).mul_(p)  # (dP - D) * P
        del p
        dq[:, :, i0:i1] = torch.bmm(ds, kk[:, :i1]).view(b * hk, g, m, d)
        dk[:, :i1] += torch.bmm(ds.transpose(1, 2), qb[..., :d])
    return (dq.view(b, h, n, d).mul_(scale), dk.mul_(scale).to(k.dtype).view(b, hk, n, d),
            dv.to(v.dtype).view(b, hk, n, d))


class _CausalAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        return (*attention_backward(grad_out, q, k, v, out, lse, ctx.scale), None)


def takes_fast_path(query, key, value, attention_mask, dropout, is_causal, kwargs) -> bool:
    """Whether this call is a plain causal training pass this backward computes exactly as SDPA's would."""
    return (torch.is_grad_enabled() and query.requires_grad and query.device.type == "cpu"
            and query.dtype == key.dtype == value.dtype == torch.bfloat16 and attention_mask is None
            and not dropout and is_causal is not False and query.shape[2] == key.shape[2] > 1
            and query.shape[1] % key.shape[1] == 0 and key.shape[-1] == value.shape[-1]
            and not any(kwargs.get(name) for name in _CHANGES_ATTENTION))


def causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """transformers' attention interface: (output (B, L, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # transformers (heavy): loaded

    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not takes_fast_path(query, key, value, attention_mask, dropout, is_causal, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out = _CausalAttentionFn.apply(query, key, value, float(scale))
    return out.transpose(1, 2).contiguous(), None


def use_causal_attention(model) -> bool:
    """Route model's attention through causal_attention where it runs transformers' SDPA (the masks stay SDPA's);
    returns whether it now does."""
    from transformers import AttentionInterface  # transformers (heavy): loaded with the model, not with this module
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(ATTENTION, causal_attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    base.set_attn_implementation(ATTENTION)
    return base.config._attn_implementation == ATTENTION
