"""Fused training kernels, written where autograd's generic path wastes time and memory on LoRA over a frozen
base. Each computes the same loss and gradients as the plain path (tests/test_train_fused.py checks both):

- `LoraLinear`: y = x W^T + s (drop(x) A^T) B^T in one autograd node. peft's module saves a dropped copy of x
  for every LoRA layer, a cast copy for autocast and the scaled product; this node saves x (shared by q/k/v and
  gate/up, which take the same input), the dropout mask and the r-wide product, and recomputes drop(x) in
  backward. The frozen W gets no gradient, so its product needs nothing saved but W itself.
- `GatedDown`: a Llama-style MLP's down(silu(gate) * up) with the activation inside the down projection's node,
  which saves gate and up only and recomputes silu and the product in backward.
- `_RecomputedMlpFn` (recompute_mlp, the default): the whole gated MLP in one node that keeps neither gate nor up
  (half of what a step keeps for backward) and recomputes their frozen products in backward.
- `RMSNorm`: Llama's RMSNorm over a frozen weight, saving its input in the stream's dtype, not an fp32 copy. The
  LoRA layers that read its output (q, k, v; gate, up) don't save that output: backward recomputes it once from
  what the norm saved (`_Normed`), one elementwise pass for 2.3 KB a token a norm.
- `linear_cross_entropy`: the output layer and the cross-entropy at labelled positions, chunk by chunk. The
  frozen head needs no weight gradient, so the gradient with respect to the hidden states is computed in the
  forward pass and the (tokens x vocabulary) logits are never kept: about 240 KB a token for SmolLM2's 49,152
  words, the largest single saved tensor of a step.
- causal attention (`train.attention`, fused_attention): torch's CPU flash forward with a backward made of a few
  large batched matmuls, 1.2-2x faster than the flash kernel's own backward at SmolLM2's shapes.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from collegeadvisor.train.attention import use_causal_attention
from collegeadvisor.train.elementwise import EAGER, kernels

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


def _lora_forward(x2, weight, bias, lora_a, lora_b, scale, keep, keep_scale, dt):
    """y = x W^T + s (drop(x) A^T) B^T for 2-D x in dtype dt; returns y and what backward needs besides x: the
    tensors (W, A, B, the r-wide product, the mask) and the layer's constants (_lora_backward's `meta`)."""
    w, a, b = weight.to(dt), lora_a.to(dt), lora_b.to(dt)
    h = _masked(x2, keep) @ a.t()  # dropout: 1/(1-p) goes on the r-wide product, not on the wide input
    if keep is not None:
        h.mul_(keep_scale)
    y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(dt))
    y.addmm_(h, b.t(), alpha=scale)
    meta = (scale, keep_scale, (lora_a.dtype, lora_b.dtype, bias is not None and bias.requires_grad))
    return y, (w, a, b, h, keep), meta


def _lora_again(x2, bias, saved, meta):
    """_lora_forward's y once more from x and what it saved (the r-wide product included): the frozen product
    only is recomputed."""
    w, _, b, h, _ = saved
    y = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(w.dtype))
    return y.addmm_(h, b.t(), alpha=meta[0])


def _lora_backward(meta, gy, x2, saved, need_x: bool):
    """(grad x, grad bias, grad A, grad B) of _lora_forward, for 2-D x."""
    w, a, b, h, keep = saved
    s, keep_scale, (a_dtype, b_dtype, bias_grad) = meta
    g = gy.reshape(-1, gy.shape[-1]).to(w.dtype)
    grad_b = (h.t() @ g).mul_(s).t()  # not g.t() @ h: a transposed wide operand is copied first
    gh = (g @ b).mul_(s if keep is None else s * keep_scale)
    grad_a = gh.t() @ _masked(x2, keep)
    grad_x = torch.addmm(_masked(gh @ a, keep), g, w) if need_x else None
    return grad_x, (g.sum(0) if bias_grad else None), grad_a.to(a_dtype), grad_b.to(b_dtype)


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale, keep, keep_scale):
        dt = _compute_dtype(x, weight)
        ctx.normed = _Normed.of(x)  # an RMSNorm's output: recomputed in backward from what the norm saves
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dt)
            y, saved, ctx.meta = _lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scale, keep,
                                               keep_scale, dt)
        ctx.save_for_backward(*([] if ctx.normed else [x]), *saved)
        ctx.dt = dt
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        saved = list(ctx.saved_tensors)
        with torch.autocast(gy.device.type, enabled=False):
            x = ctx.normed.take().to(ctx.dt) if ctx.normed else saved.pop(0)
            grad_x, grad_bias, grad_a, grad_b = _lora_backward(ctx.meta, gy, x.reshape(-1, x.shape[-1]), saved,
                                                               ctx.needs_input_grad[0])
        grad_x = None if grad_x is None else grad_x.view(x.shape)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


class _GatedDownFn(torch.autograd.Function):
    """down(silu(gate) * up) with a LoRA down projection: saves gate and up, not silu(gate) and the product
    (3 KB a token a layer each for SmolLM2), and recomputes the two elementwise ops in backward."""

    @staticmethod
    def forward(ctx, gate, up, ops, weight, bias, lora_a, lora_b, scale, keep, keep_scale):
        dt = _compute_dtype(gate, weight)
        with torch.autocast(gate.device.type, enabled=False):
            gate, up = gate.to(dt), up.to(dt)
            act = ops.gated(gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1]))
            y, saved, ctx.meta = _lora_forward(act, weight, bias, lora_a, lora_b, scale, keep, keep_scale, dt)
        ctx.save_for_backward(gate, up, *saved)
        ctx.ops = ops
        return y.view(*gate.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        gate, up, *saved = ctx.saved_tensors
        with torch.autocast(gy.device.type, enabled=False):
            grad_gate, grad_up, *grads = _gated_down_backward(ctx.ops, ctx.meta, gy, gate, up, saved)
        return grad_gate, grad_up, None, None, *grads, None, None, None


def _gated_down_backward(ops, meta, gy, gate, up, saved):
    """(grad gate, grad up, grad bias, grad A, grad B) of down(silu(gate) * up), recomputing the activation."""
    width = gate.shape[-1]
    gate2, up2 = gate.reshape(-1, width), up.reshape(-1, width)  # 2-D: one kernel for any batch shape
    act = ops.gated(gate2, up2)
    grad_act, grad_bias, grad_a, grad_b = _lora_backward(meta, gy, act, saved, True)
    del act
    grad_gate, grad_up = ops.gated_backward(grad_act, gate2, up2)
    return grad_gate.view(gate.shape), grad_up.view(up.shape), grad_bias, grad_a, grad_b


LORA_ARGS = 7  # weight, bias, A, B, scale, keep mask, 1/(1-p): what _lora_args gives for one layer


class _RecomputedMlpFn(torch.autograd.Function):
    """The whole gated MLP, down(silu(gate(x)) * up(x)) with LoRA on all three, saving neither gate nor up (6 KB a
    token a layer for SmolLM2, half of what a step keeps for backward): backward recomputes both frozen products
    from x (which an RMSNorm's tag gives back, see _Normed) and the saved r-wide LoRA products. The cost is the
    two frozen matmuls once more (gradient checkpointing of the MLP's input projections, the rest unchanged)."""

    @staticmethod
    def forward(ctx, x, ops, *args):
        gate_args, up_args, down_args = (args[i : i + LORA_ARGS] for i in range(0, 3 * LORA_ARGS, LORA_ARGS))
        dt = _compute_dtype(x, gate_args[0])
        ctx.normed = _Normed.of(x)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dt)
            x2 = x.reshape(-1, x.shape[-1])
            gate, saved_g, meta_g = _lora_forward(x2, *gate_args, dt)
            up, saved_u, meta_u = _lora_forward(x2, *up_args, dt)
            act = ops.gated(gate, up)
            del gate, up
            y, saved_d, meta_d = _lora_forward(act, *down_args, dt)
        ctx.save_for_backward(*([] if ctx.normed else [x]), *saved_g, *saved_u, *saved_d)
        ctx.meta, ctx.biases, ctx.dt, ctx.shape = (meta_g, meta_u, meta_d), (gate_args[1], up_args[1]), dt, x.shape
        ctx.ops = ops
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        saved = list(ctx.saved_tensors)
        meta_g, meta_u, meta_d = ctx.meta
        with torch.autocast(gy.device.type, enabled=False):
            x = ctx.normed.take().to(ctx.dt) if ctx.normed else saved.pop(0)
            x2 = x.reshape(-1, x.shape[-1])
            saved_g, saved_u, saved_d = saved[0:5], saved[5:10], saved[10:15]
            gate = _lora_again(x2, ctx.biases[0], saved_g, meta_g)
            up = _lora_again(x2, ctx.biases[1], saved_u, meta_u)
            grad_gate, grad_up, *grads_d = _gated_down_backward(ctx.ops, meta_d, gy, gate, up, saved_d)
            del gate, up
            need_x = ctx.needs_input_grad[0]
            grad_x, *grads_g = _lora_backward(meta_g, grad_gate, x2, saved_g, need_x)
            del grad_gate
            grad_xu, *grads_u = _lora_backward(meta_u, grad_up, x2, saved_u, need_x)
            if need_x:
                grad_x = grad_x.add_(grad_xu).view(ctx.shape)
        per_layer = lambda grads: (None, grads[0], grads[1], grads[2], None, None, None)  # noqa: E731
        return (grad_x, None, *per_layer(grads_g), *per_layer(grads_u), *per_layer(grads_d))


def _plain_adapter(layer, args=(), kwargs=None) -> str | None:
    """The adapter name when a peft LoRA Linear runs one plain LoRA adapter over an nn.Linear (the fused case);
    None for merged or disabled adapters, several adapters, DoRA and other variants, or extra arguments."""
    active = layer.active_adapters
    if (args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1 or active[0] not in layer.lora_A
            or active[0] in getattr(layer, "lora_variant", {}) or not isinstance(layer.base_layer, torch.nn.Linear)):
        return None
    return active[0]


def _lora_args(layer, name: str, x: torch.Tensor) -> tuple:
    """(weight, bias, A, B, scale, keep mask or None, 1/(1-p)) of a fused LoRA layer, drawing its dropout mask."""
    drop = layer.lora_dropout[name]
    keep, keep_scale = (drop.mask(x), 1.0 / (1.0 - drop.p)) if getattr(drop, "p", 0) > 0 and layer.training \
        else (None, 1.0)
    base = layer.base_layer
    return (base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]),
            keep, keep_scale)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's lora.Linear.forward for one plain LoRA adapter, as one autograd node; anything else takes peft's
    own path."""
    name = _plain_adapter(self, args, kwargs)
    if name is None:
        return self._plain_forward(x, *args, **kwargs)
    return _LoraLinearFn.apply(x, *_lora_args(self, name, x))


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """A gated MLP, down(silu(gate(x)) * up(x)), with the activation inside the down projection's node; with
    recompute_mlp set on the module (fuse_kernels), the whole MLP in one node that keeps neither gate nor up."""
    names = [_plain_adapter(m) for m in (self.gate_proj, self.up_proj, self.down_proj)]
    ops = _ops(self)
    if getattr(self, "recompute_mlp", False) and None not in names and torch.is_grad_enabled():
        wide = x.new_empty(()).expand(*x.shape[:-1], self.down_proj.in_features)  # down's input, for its mask
        args = [*_lora_args(self.gate_proj, names[0], x), *_lora_args(self.up_proj, names[1], x),
                *_lora_args(self.down_proj, names[2], wide)]  # masks drawn in the unfused path's order
        return _RecomputedMlpFn.apply(x, ops, *args)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if names[2] is None:
        return self.down_proj(self.act_fn(gate) * up)
    return _GatedDownFn.apply(gate, up, ops, *_lora_args(self.down_proj, names[2], gate))


def _ops(module) -> types.SimpleNamespace:
    """The elementwise kernels a fused module runs (fuse_kernels sets them): the compiled ones in training, the eager
    ones under no_grad (generation and evaluation keep their values)."""
    return getattr(module, "elementwise_kernels", EAGER) if torch.is_grad_enabled() else EAGER


GATED_MLP = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"


def _computes_gated_mlp(cls: type) -> bool:
    """Whether cls.forward is exactly the Llama-style gated MLP (LlamaMLP, Qwen2MLP, MistralMLP...)."""
    return _source_has(cls, GATED_MLP)


def _gated_silu_mlp(m) -> bool:
    """A Llama-style MLP (SmolLM2, TinyLlama, Qwen2, Mistral) with SiLU and a LoRA down projection."""
    return (hasattr(m, "down_proj") and hasattr(m.down_proj, "lora_A") and hasattr(m, "act_fn")
            and type(m.act_fn).__name__ in ("SiLU", "SiLUActivation") and _computes_gated_mlp(type(m)))


class _RMSNormFn(torch.autograd.Function):
    """Llama's RMSNorm with a frozen weight: saves its input in the stream's dtype and the r.m.s., not the fp32
    copy of the input (2.3 KB a token for SmolLM2, twice a layer). Its output is tagged (`_Normed`) so that the
    fused LoRA layers reading it recompute it in backward instead of saving it."""

    @staticmethod
    def forward(ctx, x, weight, eps, tag, ops):
        out, rstd = ops.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps)  # 2-D: one kernel for any batch shape
        out, rstd = out.view(x.shape), rstd.view(*x.shape[:-1], 1)
        ctx.save_for_backward(x, weight, rstd)
        tag.x, tag.weight, tag.rstd, tag.ops = x, weight, rstd, ops
        ctx.ops = ops
        return out

    @staticmethod
    def backward(ctx, gy):
        x, weight, rstd = ctx.saved_tensors
        width = x.shape[-1]
        grad = ctx.ops.rms_norm_backward(gy.reshape(-1, width), x.reshape(-1, width), weight, rstd.reshape(-1, 1))
        return grad.view(x.shape), None, None, None, None


class _Normed:
    """An RMSNorm's output as its input, weight and r.m.s. (which the norm's node saves anyway). The LoRA layers
    that read it (q, k and v; gate and up) save this instead of the output, 2.3 KB a token a norm for SmolLM2, and
    the first of them to run backward recomputes the output once for all of them: the same ops, so the same
    values."""

    __slots__ = ("x", "weight", "rstd", "ops", "readers", "value")

    def __init__(self):
        self.x = self.weight = self.rstd = self.ops = self.value = None
        self.readers = 0

    @staticmethod
    def of(x: torch.Tensor) -> "_Normed | None":
        tag = getattr(x, "_normed", None)
        if tag is not None:
            tag.readers += 1
        return tag

    def take(self) -> torch.Tensor:
        if self.value is None:
            width = self.x.shape[-1]
            normed = self.ops.rms_normed(self.x.reshape(-1, width), self.weight, self.rstd.reshape(-1, 1))
            self.value = normed.view(self.x.shape)
        value, self.readers = self.value, self.readers - 1
        if self.readers <= 0:
            self.value = None  # the last reader: free it
        return value


RMS_NORM = "hidden_states*torch.rsqrt(variance+self.variance_epsilon)returnself.weight*hidden_states.to(input_dtype)"


def _fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad:
        return self._plain_forward(hidden_states)
    tag = _Normed()
    out = _RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon, tag, _ops(self))
    if torch.is_grad_enabled():
        out._normed = tag
    return out


def _source_has(cls: type, code: str) -> bool:
    """Whether cls.forward's source contains code (whitespace ignored): the exact computation a kernel replaces."""
    source = _compact_source(cls)
    return source is not None and "".join(code.split()) in source


@functools.lru_cache(maxsize=None)
def _compact_source(cls: type) -> str | None:
    try:
        return "".join(inspect.getsource(cls.forward).split())
    except (OSError, TypeError):
        return None


def _route(module, forward) -> None:
    if not hasattr(module, "_plain_forward"):
        module._plain_forward = module.forward
        module.forward = types.MethodType(forward, module)


def fuse_kernels(model, recompute_mlp: bool = False, attention: bool = False, elementwise: bool = False) -> int:
    """Route every peft LoRA Linear of model through the fused node, Llama-style MLPs through the gated one (or,
    with recompute_mlp, the one that recomputes gate and up in backward), Llama-style RMSNorms through theirs and,
    with attention, SDPA attention through train.attention's (the modules, their weights and saving are
    unchanged). With elementwise, the norms', the MLPs' and the loss's elementwise work runs through
    train.elementwise's generated kernels (kept on each module and on the model as `elementwise_kernels`).
    Returns how many LoRA layers now run fused."""
    if attention:
        use_causal_attention(model)
    ops = kernels(elementwise)
    model.elementwise_kernels = ops  # LabelLoss's output layer reads it
    count = 0
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and _source_has(type(m), RMS_NORM):
            _route(m, _fused_norm_forward)
            m.elementwise_kernels = ops
        if type(m).__name__ == "Linear" and hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            _route(m, _fused_forward)
            count += 1
        elif _gated_silu_mlp(m):
            _route(m, _fused_mlp_forward)
            m.recompute_mlp, m.elementwise_kernels = recompute_mlp, ops
    return count


# ============================================================================================ output layer + loss
class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, ops):
        dt = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dt), weight.to(dt)
            grad = torch.empty_like(h)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for i in range(0, h.shape[0], chunk):
                loss, grad_logits = ops.softmax_cross_entropy(h[i : i + chunk] @ w.t(), targets[i : i + chunk])
                total += loss
                grad[i : i + chunk] = grad_logits @ w
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype)).to(ctx.hidden_dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK,
                         ops=EAGER) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), for a frozen weight (no gradient to it); ops: the
    elementwise kernels of its softmax (train.elementwise), used where grad is enabled."""
    if weight.requires_grad:
        logits = torch.nn.functional.linear(hidden, weight).float()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return _LinearCrossEntropyFn.apply(hidden, weight, targets, chunk, ops if torch.is_grad_enabled() else EAGER)
