"""What train builds on the base model: LoRA adapters (fp32 weights, a faster dropout), the frozen base in bf16, and
the loss at labelled positions only. Train and check's measured step both build it here."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from collegeadvisor.chat_format import IGNORE_INDEX
from collegeadvisor.config import Config
from collegeadvisor.train.elementwise import kernels_for
from collegeadvisor.train.fused import fuse_kernels, linear_cross_entropy


class LabelLoss(torch.nn.Module):
    """Sum of token cross-entropy at labelled positions only: the output layer (49k vocabulary for SmolLM2) runs
    on assistant tokens, not on every prompt token. Wrapping it as a module keeps DDP's gradient hooks intact."""

    def __init__(self, model, fused: bool = True):
        super().__init__()
        self.model = model
        self.fused = fused
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = causal.config
        plain = getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None
        self.decoder = causal.get_decoder() if plain and hasattr(causal, "get_decoder") else None
        self.head = causal.get_output_embeddings() if self.decoder is not None else None

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        """Packed rows (batching.collate_packed) come with position_ids and no attention_mask; use_cache=False
        is what keeps their examples apart."""
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if attention_mask is not None and right_padded(attention_mask):
            attention_mask = None  # causal attention alone gives every real token the same output (see right_padded)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        if self.decoder is None:  # models that post-process logits: full forward
            logits = self.model(**inputs).logits[:, :-1]
            return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
        hidden = self.decoder(**inputs).last_hidden_state[:, :-1][keep]
        if self.fused and self.head.bias is None:  # the logits are never kept (train.fused)
            return linear_cross_entropy(hidden, self.head.weight, targets[keep], ops=kernels_for(self.model))
        logits = self.head(hidden)
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")



def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row is its tokens then padding (what batching.collate builds). Then the padding mask can be
    dropped: under causal attention a real token sees only earlier positions, all real, and pad positions carry no
    label. Attention then runs as plain causal (is_causal), which skips the blocks above the diagonal; with a
    padding mask the CPU flash kernel computes every block (8% of a step at 4 x 400, AMD EPYC)."""
    return bool((attention_mask[:, :-1] >= attention_mask[:, 1:]).all())


def keep_base_in_bf16(model) -> None:
    """Frozen base weights stored in bf16 (half the memory, and autocast no longer re-casts every fp32 weight on
    every pass); LoRA weights stay fp32. Under autocast, peft is told not to up-cast each LoRA input to fp32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    for m in model.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False


class LoraDropout(torch.nn.Module):
    """Dropout on each LoRA layer's input, with its mask drawn 4 positions per random number: torch's dropout draws
    one number per position on the CPU (one serial Mersenne-Twister call each: ~20% of a LoRA step on 2 cores);
    here each 64-bit draw gives four uniform 16-bit words, compared with p (p rounded to 1/65536). Same
    distribution, the global torch generator (so seeds and resume hold), a bool mask kept for backward."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The positions of x that are kept (bool, x's shape)."""
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        return words.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x.mul(self.mask(x)).mul_(1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def lora_model(model, cfg: Config):
    """The base model with LoRA adapters as cfg sets them (r, alpha, dropout, target layers), LoRA weights in fp32
    even over a bf16 base, LoRA dropout drawn by LoraDropout, and (cfg.fused) each LoRA layer run as one fused
    autograd node. Train and check build it here."""
    from peft import LoraConfig, get_peft_model  # peft (heavy): only when a model is built

    targets = "all-linear" if cfg.lora_target == "all-linear" else [t.strip() for t in cfg.lora_target.split(",")]
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights train in fp32 even over a bf16 base
    for m in model.modules():
        drops = getattr(m, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, d in list(drops.items()):
                if isinstance(d, torch.nn.Dropout) and d.p > 0:
                    drops[name] = LoraDropout(d.p)
    if cfg.fused:
        # with compile, torch.compile takes the whole model: no elementwise kernels compiled inside it as well
        fuse_kernels(model, cfg.recompute_mlp, cfg.fused_attention, cfg.fused_elementwise and not cfg.compile)
    return model


def adapter_digest(model) -> str:
    """sha256 of the trainable weights, in name order: equal on every rank of a healthy data-parallel run."""
    h = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

