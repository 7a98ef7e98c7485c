"""Causal attention for LoRA training on CPU: torch's flash kernel forward, and a backward built from a few large
batched matmuls instead of the flash kernel's own.

torch's CPU flash-attention backward runs many small bf16 matmuls per (example, head) and costs 6-15x its forward
(one SmolLM2 layer in transformers' layout, 2 threads, Intel Xeon with AMX: 26.5 / 31.8 / 27.9 ms at 10 x 200 /
6 x 400 / 4 x 512 tokens, against 2-4 ms forward; this backward 13.4 / 24.0 / 23.1 ms). This backward takes query
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

from collegeadvisor.train.elementwise import EAGER, kernels_for

ATTENTION = "collegeadvisor_sdpa"  # the name under transformers' AttentionInterface and AttentionMaskInterface
BLOCK = 128  # queries per block: 96-128 measured fastest at 200-512 tokens (SmolLM2's shapes); 64 and 256 slower
EXTRA = 2  # folded columns: a value in two bf16 parts
# keyword arguments transformers may pass that change the computation; the fast path runs only when all are unset
_CHANGES_ATTENTION = ("softcap", "sliding_window", "position_bias", "s_aux", "output_attentions")


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x as two bf16 parts whose sum keeps 16 bits of it."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def attention_backward(grad_out, q, k, v, out, lse, scale: float, block: int = BLOCK, ops=EAGER):
    """(grad q, grad k, grad v) of causal softmax(scale q k^T) v, from flash's output and logsumexp. q, grad_out:
    (B, H, L, D); k, v: (B, Hk, L, D), H a multiple of Hk; all bf16, any strides; lse fp32 (B, H, L). ops: the
    elementwise kernels (train.elementwise) of its two elementwise steps."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    g, e = h // hk, d + EXTRA
    row = ops.row_dot(grad_out, out)  # D = rowsum(dO * O), in fp32 as flash computes it

    def rows(x, extra):
        """x (b, h, n, d) as (b*hk, n*g, e): each query's g heads of a key/value group side by side (so a block of
        queries is a contiguous run of rows), extra's two bf16 parts appended."""
        folded = x.new_empty(b, hk, n, g, e)
        folded[..., :d] = x.view(b, hk, g, n, d).transpose(2, 3)
        folded[..., d], folded[..., d + 1] = _split(extra.view(b, hk, g, n).transpose(2, 3))
        return folded.view(b * hk, n * g, e)

    def with_ones(x):
        folded = x.new_empty(b, hk, n, e)
        folded[..., :d], folded[..., d:] = x, 1
        return folded.view(b * hk, n, e)

    qa, ga, ka, va = rows(q, -lse / scale), rows(grad_out, -row), with_ones(k), with_ones(v)
    qp, gp, kp = (x[..., :d].contiguous() for x in (qa, ga, ka))  # bmm copies a strided operand on every call
    dq = q.new_empty(b, hk, g, n, d)  # (b, h, n, d): head kvh * g + j is row j of group kvh
    dk = torch.zeros(b * hk, n, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    above = torch.ones(block, block, dtype=torch.bool, device=q.device).triu_(1)[:, None, :]
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        r0, r1 = i0 * g, i1 * g
        p = ops.scaled_exp(torch.bmm(qa[:, r0:r1], ka[:, :i1].transpose(1, 2)), scale)  # P, (b*hk, rows, keys)
        p.view(b * hk, i1 - i0, g, i1)[..., i0:i1].masked_fill_(above[: i1 - i0, :, : i1 - i0], 0)
        dv[:, :i1].add_(torch.bmm(p.transpose(1, 2), gp[:, r0:r1]))  # add_, not +=: no copy back into the slice
        ds = torch.bmm(ga[:, r0:r1], va[:, :i1].transpose(1, 2)).mul_(p)  # (dP - D) * P
        del p
        # this block's rows of dq, scaled, straight into their heads' places (one pass, no copy of dq at the end)
        block_dq = torch.bmm(ds, kp[:, :i1]).view(b, hk, i1 - i0, g, d).permute(0, 1, 3, 2, 4)
        torch.mul(block_dq, scale, out=dq[:, :, :, i0:i1])
        dk[:, :i1].add_(torch.bmm(ds.transpose(1, 2), qp[:, r0:r1]))
    return dq.view(b, h, n, d), dk.mul_(scale).to(k.dtype).view(b, hk, n, d), dv.to(v.dtype).view(b, hk, n, d)


class _CausalAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, ops):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.ops = scale, ops
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        return (*attention_backward(grad_out, q, k, v, out, lse, ctx.scale, ops=ctx.ops), None, None)


def takes_fast_path(query, key, value, attention_mask, dropout, is_causal, kwargs) -> bool:
    """Whether this call is a plain causal training pass on CPU in bf16: the one this node computes (SDPA's own
    output; its gradients to bf16 precision)."""
    return (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
            and query.device.type == "cpu"
            and query.dtype == key.dtype == value.dtype == torch.bfloat16 and attention_mask is None
            and not dropout and is_causal is not False and query.shape[2] == key.shape[2] > 1
            and query.shape[1] % key.shape[1] == 0 and key.shape[-1] == value.shape[-1]
            and not any(kwargs.get(name) for name in _CHANGES_ATTENTION))


def causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """transformers' attention interface: (output (B, L, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # heavy: imported where it runs

    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not takes_fast_path(query, key, value, attention_mask, dropout, is_causal, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out = _CausalAttentionFn.apply(query, key, value, float(scale), kernels_for(module))
    return out.transpose(1, 2).contiguous(), None


def use_causal_attention(model) -> None:
    """Route model's attention through causal_attention where it runs transformers' SDPA (the masks stay SDPA's)."""
    from transformers import AttentionInterface  # heavy: imported where it runs
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) == "sdpa":
        AttentionInterface.register(ATTENTION, causal_attention)
        AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        base.set_attn_implementation(ATTENTION)
