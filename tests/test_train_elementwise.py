"""train.elementwise: the kernels torch.compile generates for the elementwise work of a training step give the eager
functions' values (to the last bit or two: a sum in another order), for any number of rows without compiling again;
training takes them and no_grad passes don't; and a machine where compiling fails trains on the eager functions."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from collegeadvisor.train import elementwise
from collegeadvisor.train.elementwise import EAGER, kernels


def inputs(rows: int, width: int, dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    x = r(rows, width) * 3
    return {"x": x, "w": r(width), "gy": r(rows, width), "gate": r(rows, 2 * width), "up": r(rows, 2 * width),
            "grad": r(rows, 2 * width), "logits": r(rows, 5 * width) * 4,
            "targets": torch.randint(0, 5 * width, (rows,), generator=g)}


def calls(ops, a: dict) -> dict:
    out, rstd = ops.rms_norm(a["x"], a["w"], 1e-5)
    loss, grad_logits = ops.softmax_cross_entropy(a["logits"], a["targets"])
    return {"rms_norm": out, "rstd": rstd, "rms_normed": ops.rms_normed(a["x"], a["w"], rstd),
            "rms_norm_backward": ops.rms_norm_backward(a["gy"], a["x"], a["w"], rstd),
            "gated": ops.gated(a["gate"], a["up"]), **dict(zip(("grad_gate", "grad_up"),
                                                               ops.gated_backward(a["grad"], a["gate"], a["up"]))),
            "loss": loss, "grad_logits": grad_logits, "row_dot": ops.row_dot(a["gy"], a["x"]),
            "scaled_exp": ops.scaled_exp(a["x"] - 4, 0.3)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_compiled_kernel_gives_the_eager_values(dtype):
    ops = kernels(True)
    assert ops.compiled and not EAGER.compiled
    for rows, width in ((37, 64), (130, 96)):  # different shapes, the second without a new compile (below)
        a = inputs(rows, width, dtype)
        got, want = calls(ops, a), calls(EAGER, a)
        for name, w in want.items():
            g = got[name]
            assert g.dtype == w.dtype and g.shape == w.shape, name
            # bf16 outputs: within 1% of their scale (an ulp is 0.4-0.8%: one rounding apart); fp32: 1e-5
            rel = 1e-2 if w.dtype == torch.bfloat16 else 1e-5
            assert float((g.float() - w.float()).abs().max()) <= rel * float(w.float().abs().max()), name
            if w.dtype == torch.bfloat16:  # and almost all elements identical
                assert float((g != w).float().mean()) < 0.05, name


def test_a_new_number_of_rows_compiles_nothing():
    ops = kernels(True)
    for rows in (48, 52):  # the first may compile (once a process: the test above may have done it)
        calls(ops, inputs(rows, 64, torch.bfloat16))
    before = counters["stats"]["unique_graphs"]
    calls(ops, inputs(301, 64, torch.bfloat16))
    calls(ops, inputs(77, 128, torch.bfloat16))  # another width too: a model of another size
    assert counters["stats"]["unique_graphs"] == before


def test_a_compiler_failure_falls_back_to_the_eager_functions(monkeypatch, caplog):
    def broken(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(broken, RuntimeError("no g++ here"), None)

    monkeypatch.setattr(elementwise, "_broken", [])
    run = elementwise._on_cpu(EAGER.gated, broken)
    a = inputs(8, 16, torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="collegeadvisor.train.elementwise"):
        assert torch.equal(run(a["gate"], a["up"]), EAGER.gated(a["gate"], a["up"]))
        assert torch.equal(run(a["gate"], a["up"]), EAGER.gated(a["gate"], a["up"]))
    assert len(caplog.records) == 1 and "run eagerly" in caplog.records[0].getMessage()
    assert elementwise._broken and elementwise._broken == ["RuntimeError: no g++ here"]
    # every other kernel now stays eager too: it never reaches its compiled function
    other = elementwise._on_cpu(EAGER.rms_normed, broken)
    x, w = a["x"], a["w"]
    assert torch.equal(other(x, w, torch.ones(8, 1)), EAGER.rms_normed(x, w, torch.ones(8, 1)))


def test_other_errors_are_not_swallowed(monkeypatch):
    def fails(*args):
        raise ValueError("a real error")

    monkeypatch.setattr(elementwise, "_broken", [])
    with pytest.raises(ValueError, match="a real error"):
        elementwise._on_cpu(EAGER.gated, fails)(torch.ones(2, 2), torch.ones(2, 2))


def fused_model(path, on: bool):
    """The recipe's model in bf16 with the elementwise kernels on or off, and its loss."""
    from test_train_fused import build

    loss_fn = build(path, fused=True, dropout=0.0, bf16=True, fused_elementwise=on)
    return loss_fn.model, loss_fn


def test_training_runs_the_compiled_kernels_and_no_grad_passes_the_eager_ones(tinyllama_tiny_model,
                                                                               tinyllama_tokenizer, monkeypatch):
    from collegeadvisor.train.batching import collate
    from test_speed_paths import encoded_rows, lora_grads

    batch = collate(encoded_rows(tinyllama_tokenizer, 4), tinyllama_tokenizer.pad_token_id)
    results = {}
    for on in (False, True):
        model, loss_fn = fused_model(tinyllama_tiny_model, on)
        norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        assert norms and all(m.elementwise_kernels.compiled is on for m in norms)
        assert model.elementwise_kernels.compiled is on
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(**batch)
        loss.backward()
        results[on] = float(loss), lora_grads(model)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            results[on, "no_grad"] = model(input_ids=batch["input_ids"]).logits
    (off_loss, off_grads), (on_loss, on_grads) = results[False], results[True]
    assert on_loss == pytest.approx(off_loss, rel=2e-3)
    assert float(torch.nn.functional.cosine_similarity(on_grads, off_grads, dim=0)) >= 0.999
    assert torch.equal(results[True, "no_grad"], results[False, "no_grad"])  # generation's values are unchanged

    # and the compiled functions are what a training pass calls
    used = []
    compiled = kernels(True)
    for name in elementwise.NAMES:
        fn = getattr(compiled, name)
        monkeypatch.setattr(compiled, name, lambda *a, _fn=fn, _name=name: used.append(_name) or _fn(*a))
    model, loss_fn = fused_model(tinyllama_tiny_model, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(**batch).backward()
    assert set(used) == set(elementwise.NAMES)
    used.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(**batch)
    assert used == []


def test_a_machine_without_a_cxx_compiler_trains_on_the_eager_functions(tmp_path):
    """The real failure: inductor finds no C++ compiler (a fresh kernel cache, so nothing compiled is reused)."""
    import os
    import subprocess
    import sys

    script = """
import torch, torch._inductor.config as ic
ic.cpp.cxx = ("/nonexistent/g++",)
from collegeadvisor.train import elementwise as E
x, w = torch.randn(10, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
out, rstd = E.kernels(True).rms_norm(x, w, 1e-6)
print(torch.equal(out, E.EAGER.rms_norm(x, w, 1e-6)[0]), E._broken)
"""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith('True ["InvalidCxxCompiler: No working C++ compiler')
    assert "fused_elementwise: torch.compile failed (InvalidCxxCompiler" in proc.stderr
    assert "elementwise kernels run eagerly" in proc.stderr and "Traceback" not in proc.stderr
