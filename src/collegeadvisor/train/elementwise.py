"""The elementwise work of a training step, as kernels torch.compile (inductor) generates on CPU.

In eager mode each op of an RMSNorm, the gated MLP's activation, the loss's softmax or attention backward's row
terms is its own pass over memory, with fp32 copies made and freed between passes; inductor fuses each function
below into one or two loops (2 threads, Intel Xeon with AMX, one call: RMSNorm backward on 1,600 x 576 tokens
2.5-3.8 ms eager, 0.27 ms generated; attention's D on 4 x 9 x 400 x 64, 1.96 ms and 0.23 ms). The kernels round
where the eager ops round (inductor's emulate_precision_casts), so they give the eager values to the last bit or
two (a sum in another order); tests/test_train_elementwise.py bounds the difference.

The same functions run eagerly where no kernel is compiled: off the CPU, under no_grad (generation and evaluation
keep their eager values), with `fused_elementwise: false`, and after compiling failed (no C++ compiler on the
machine), which is logged once. `kernels(compiled)` gives the set of functions the fused modules call
(train.fused keeps it on each module as `elementwise_kernels`)."""

from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- the functions
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's RMSNorm, weight * (x.float() * rstd).to(x.dtype), and its fp32 rstd (what backward needs)."""
    squares = x.pow(2) if x.dtype == torch.float32 else x.float().pow_(2)  # one fp32 tensor, x left alone
    rstd = torch.rsqrt(squares.mean(-1, keepdim=True) + eps)
    return rms_normed(x, weight, rstd), rstd


def rms_normed(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The norm's output again from its input and rstd: x * rstd (fp32 rstd) computes in fp32 as x.float() * rstd
    does, the same values without an fp32 copy of x."""
    return weight * (x * rstd).to(x.dtype)


def rms_norm_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d loss / d x of rms_norm for a frozen weight: rstd * (gn - n * mean(gn * n)), gn = gy * weight, n = x * rstd."""
    gn = (gy * weight).float()
    n = x * rstd  # fp32 (see rms_normed)
    return torch.addcmul(gn, n, (gn * n).mean(-1, keepdim=True), value=-1).mul_(rstd).to(x.dtype)


def gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A Llama MLP's activation, silu(gate) * up."""
    return torch.nn.functional.silu(gate).mul_(up)


def gated_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/d gate, d/d up) of silu(gate) * up, given the gradient of its output."""
    grad_up = grad * torch.nn.functional.silu(gate)
    return torch.ops.aten.silu_backward(grad * up, gate), grad_up


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the rows' cross-entropy, its gradient with respect to the logits, in their dtype) for (n, V) logits:
    softmax(logits) - onehot(targets), in fp32 (log_softmax upcasts inside its kernel)."""
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    loss = -logp.gather(1, targets[:, None]).sum()
    probs = logp.exp_()  # the softmax, in place of the log-probabilities
    probs[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return loss, probs.to(logits.dtype)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rowwise dot products over the last dimension, in fp32: attention backward's D = rowsum(dO * O)."""
    return (a.float() * b.float()).sum(-1)


def scaled_exp(s: torch.Tensor, scale: float) -> torch.Tensor:
    """exp(scale * s), in s's dtype: attention backward's probabilities from its normalised scores."""
    return s.mul(scale).exp_()


NAMES = ("rms_norm", "rms_normed", "rms_norm_backward", "gated", "gated_backward", "softmax_cross_entropy", "row_dot",
         "scaled_exp")
EAGER = types.SimpleNamespace(**{name: globals()[name] for name in NAMES}, compiled=False)


# ---------------------------------------------------------------------------------------- compiled on CPU
_broken: list[str] = []  # why compiling failed, once seen: every kernel stays eager in this process


def _reason(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def _on_cpu(eager, compiled):
    """eager's result, through the compiled kernel where every tensor argument is on the CPU."""

    def run(*args):
        if _broken or any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
            return eager(*args)
        try:
            return compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as exc:  # e.g. no working C++ compiler on this machine
            _broken.append(_reason(getattr(exc, "inner_exception", exc)))
            log.warning("fused_elementwise: torch.compile failed (%s); elementwise kernels run eagerly", _broken[0])
            return eager(*args)

    run.__name__ = eager.__name__
    return run


def kernels_for(module) -> types.SimpleNamespace:
    """The set a module runs now: the one fuse_kernels kept on it (`elementwise_kernels`) while grad is enabled
    (training), the eager functions otherwise (generation and evaluation keep their eager values)."""
    return getattr(module, "elementwise_kernels", EAGER) if torch.is_grad_enabled() else EAGER


OPTIONS = {"emulate_precision_casts": True}  # round where eager rounds: 1-2% slower kernels, eager's values
_COMPILED: types.SimpleNamespace | None = None


def kernels(compiled: bool = True) -> types.SimpleNamespace:
    """The functions above, each through its generated kernel on CPU (compiled) or all eager. The compiled set is
    built once a process; each kernel compiles at its first call (seconds; inductor caches them on disk), for any
    number of rows (dynamic shapes), so passes of new lengths compile nothing."""
    global _COMPILED
    if not compiled:
        return EAGER
    if _COMPILED is None:
        made = {name: _on_cpu(getattr(EAGER, name), torch.compile(getattr(EAGER, name), dynamic=True, options=OPTIONS))
                for name in NAMES}
        _COMPILED = types.SimpleNamespace(**made, compiled=True)
    return _COMPILED
