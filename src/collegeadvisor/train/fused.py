"""Two fused training kernels, written where autograd's generic path wastes time and memory on LoRA over a frozen
base. Each computes the same loss and gradients as the plain path (tests/test_train_fused.py checks both):

- `LoraLinear`: y = x W^T + s (drop(x) A^T) B^T in one autograd node. peft's module saves a dropped copy of x
  for every LoRA layer, a cast copy for autocast and the scaled product; this node saves x (shared by q/k/v and
  gate/up, which take the same input), the dropout mask and the r-wide product, and recomputes drop(x) in
  backward. The frozen W gets no gradient, so its product needs nothing saved but W itself.
- `linear_cross_entropy`: the output layer and the cross-entropy at labelled positions, chunk by chunk. The
  frozen head needs no weight gradient, so the gradient with respect to the hidden states is computed in the
  forward pass and the (tokens x vocabulary) logits are never kept: about 240 KB a token for SmolLM2's 49,152
  words, the largest single saved tensor of a step.
"""

from __future__ import annotations

import types

import torch

CHUNK = 256  # labelled positions per chunk of logits: 256 x 49,152 fp32 is 50 MB, freed chunk by chunk


# ============================================================================================ LoRA linear
def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run this layer's matmuls in (bf16/fp16 under autocast, else the weight's)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def _masked(x2: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x (2-D) with the dropped positions zeroed. The bool mask is read as uint8: bool -> bf16 and where() on bf16
    are not vectorized on CPU (6-7x slower than this multiply, measured on 1600 x 576)."""
    return x2 if keep is None else x2 * keep.reshape(x2.shape).view(torch.uint8)


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, keep, keep_scale):
        dt = _compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dt)
            w, a, b = weight.to(dt), lora_a.to(dt), lora_b.to(dt)
            x2 = x.reshape(-1, x.shape[-1])
            # dropout: masked x, with 1/(1-p) applied to the r-wide product instead of the wide input
            h = _masked(x2, keep) @ a.t()
            if keep is not None:
                h.mul_(keep_scale)
            y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(dt))
            y.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x, w, a, b, h, keep)
        ctx.scale, ctx.keep_scale = scale, keep_scale
        ctx.dtypes = (lora_a.dtype, lora_b.dtype, None if bias is None else bias.requires_grad)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x, w, a, b, h, keep = ctx.saved_tensors
        s = ctx.scale
        a_dtype, b_dtype, bias_grad = ctx.dtypes
        with torch.autocast(gy.device.type, enabled=False):
            g = gy.reshape(-1, gy.shape[-1]).to(w.dtype)
            x2 = x.reshape(-1, x.shape[-1])
            grad_b = (h.t() @ g).mul_(s).t()  # not g.t() @ h: a transposed wide operand is copied first
            gh = (g @ b).mul_(s if keep is None else s * ctx.keep_scale)
            grad_a = gh.t() @ _masked(x2, keep)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.addmm(_masked(gh @ a, keep), g, w).view(x.shape)
            grad_bias = g.sum(0) if bias_grad else None
        return grad_x, None, grad_bias, grad_a.to(a_dtype), grad_b.to(b_dtype), None, None, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's lora.Linear.forward for one plain LoRA adapter, as one autograd node; anything else (merged or
    disabled adapters, several adapters, DoRA and other variants, extra arguments) takes peft's own path."""
    active = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] not in self.lora_A
            or active[0] in getattr(self, "lora_variant", {}) or not isinstance(self.base_layer, torch.nn.Linear)):
        return self._peft_forward(x, *args, **kwargs)
    name = active[0]
    drop = self.lora_dropout[name]
    keep, keep_scale = (drop.mask(x), 1.0 / (1.0 - drop.p)) if getattr(drop, "p", 0) > 0 and self.training else (None, 1.0)
    base = self.base_layer
    return _LoraLinearFn.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                               float(self.scaling[name]), keep, keep_scale)


def fuse_lora(model) -> int:
    """Route every peft LoRA Linear of model through the fused node (the modules, their weights and saving are
    unchanged); returns how many layers now run fused."""
    count = 0
    for m in model.modules():
        if type(m).__name__ == "Linear" and hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            if not hasattr(m, "_peft_forward"):
                m._peft_forward = m.forward
                m.forward = types.MethodType(_fused_forward, m)
            count += 1
    return count


# ============================================================================================ output layer + loss
class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        dt = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dt), weight.to(dt)
            grad = torch.empty_like(h)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for i in range(0, h.shape[0], chunk):
                logits = (h[i : i + chunk] @ w.t()).float()
                t = targets[i : i + chunk]
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[i : i + chunk] = probs.to(dt) @ w
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype)).to(ctx.hidden_dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), for a frozen weight (no gradient to it)."""
    if weight.requires_grad:
        logits = torch.nn.functional.linear(hidden, weight).float()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return _LinearCrossEntropyFn.apply(hidden, weight, targets, chunk)
