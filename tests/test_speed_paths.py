"""The training speed paths give the loss the plain path gives: packing (restarted position_ids, no attention
across examples), label-only logits, and the bf16 path (frozen base in bf16 + autocast, LoRA in fp32).

test_train.py already checks LabelLoss against transformers' loss on one padded batch; these go further:
per example inside a packed row, gradients, the head's input size, and whole runs through `train`.

Tolerances: fp32 paths agree to rel 1e-5 (the same sums in another order); the bf16 path stays within 0.5% of
fp32 in loss (measured here: under 0.01%), and its LoRA gradients point the same way (cosine >= 0.99).
"""

from __future__ import annotations

import pytest
import torch

from collegeadvisor.chat_format import IGNORE_INDEX, encode_conversation
from collegeadvisor.config import load_config
from collegeadvisor.runs import read_manifest
from collegeadvisor.train import recipe, train
from collegeadvisor.train.batching import collate, collate_packed, forward_batches
from helpers import advisor_rows, read_jsonl, write_jsonl

FP32_REL = 1e-5
BF16_REL = 5e-3


def encoded_rows(tokenizer, n: int = 5) -> list[dict]:
    """n encoded chats of clearly different lengths (the question repeated i+1 times)."""
    rows = []
    for i, r in enumerate(advisor_rows(n)):
        enc = encode_conversation(tokenizer, [{"role": "user", "content": " ".join([r["instruction"]] * (i + 1))},
                                              {"role": "assistant", "content": r["output"]}])
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return rows


def lora_model(path, seed: int = 0):
    """The tiny base with LoRA on all linear layers, B set to small random values so every LoRA weight has a
    gradient (B starts at zero in peft, which leaves A without one)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def lora_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for _, p in sorted(model.named_parameters()) if p.requires_grad])


def n_labels(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def cfg_for(tmp_path, model, **kw):
    data = write_jsonl(tmp_path / "data.jsonl", advisor_rows(32))
    base = dict(base_model=str(model), data=str(data), output_dir=str(tmp_path / "runs"), max_steps=4, batch_size=4,
                grad_accum=2, learning_rate=1e-2, sample_every=0, log_every=1, save_every=100, val_fraction=0.0,
                lora_dropout=0.0, autocast_bf16="off")
    base.update(kw)
    return load_config(None, base)


def step_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


# ------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_example_in_a_packed_row_has_its_unpacked_loss(tinyllama_tiny_model, tinyllama_tokenizer, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tinyllama_tiny_model, dtype=torch.float32, attn_implementation=attn)
    loss = recipe.LabelLoss(model)
    rows = encoded_rows(tinyllama_tokenizer, 4)
    bins = [rows[:3], rows[3:]]  # two packed rows of different fill: the second has a padding tail
    packed = collate_packed(bins, tinyllama_tokenizer.pad_token_id)
    assert packed["position_ids"][0].tolist().count(0) == 3  # positions restart at every example
    starts, crossed = [], 0.0
    for b, row in enumerate(bins):
        at = 0
        for r in row:
            starts.append((b, at, len(r["input_ids"]), r))
            at += len(r["input_ids"])
    for b, at, n, r in starts:
        only = torch.full_like(packed["labels"], IGNORE_INDEX)
        only[b, at : at + n] = packed["labels"][b, at : at + n]
        with torch.no_grad():
            got = loss(input_ids=packed["input_ids"], labels=only, position_ids=packed["position_ids"])
            want = loss(**collate([r], tinyllama_tokenizer.pad_token_id))
            # control: the same row with one running position and plain causal attention across examples
            running = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
            leaky = loss(input_ids=packed["input_ids"], labels=only, position_ids=running)
        assert float(got) == pytest.approx(float(want), rel=FP32_REL), (b, at)
        crossed = max(crossed, abs(float(leaky) - float(want)) / float(want))
    assert crossed > 20 * FP32_REL  # the check above would catch attention across examples


def test_packed_and_padded_passes_give_the_same_step_loss_and_gradient(tinyllama_tiny_model, tinyllama_tokenizer):
    rows = encoded_rows(tinyllama_tokenizer, 5)
    pad = tinyllama_tokenizer.pad_token_id
    results = {}
    for name, passes in {
        "padded": forward_batches(rows, pad, max_tokens=10_000),
        "padded, small passes": forward_batches(rows, pad, max_tokens=64),
        "padded to multiples of 64": forward_batches(rows, pad, max_tokens=512, multiple=64),
        "packed": forward_batches(rows, pad, max_tokens=10_000, packing=True, width=128),
        "packed, one row a pass": forward_batches(rows, pad, max_tokens=128, packing=True, width=128),
    }.items():
        model = lora_model(tinyllama_tiny_model)
        loss = recipe.LabelLoss(model)
        count = sum(n_labels(b) for b in passes)
        total = 0.0
        for b in passes:
            part = loss(**b)
            (part / count).backward()
            total += float(part.detach())
        results[name] = (total / count, count, lora_grads(model), len(passes))
    ref_loss, ref_count, ref_grad, _ = results["padded"]
    assert results["padded, small passes"][3] > 1 and results["packed, one row a pass"][3] > 1
    assert results["packed"][3] == 1
    bucketed = forward_batches(rows, pad, max_tokens=512, multiple=64)
    assert all(b["input_ids"].shape[1] % 64 == 0 and b["input_ids"].numel() <= 512 for b in bucketed)
    for name, (value, count, grad, _) in results.items():
        assert count == ref_count, name  # packing drops no label and adds none
        assert value == pytest.approx(ref_loss, rel=FP32_REL), name
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize("variant", [{"packing": True}, {"batch_tokens": 48}], ids=["packing", "small-passes"])
def test_training_with_packing_or_small_passes_follows_the_padded_run(tmp_path, tinyllama_tiny_model, variant):
    plain = step_losses(train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="plain")))
    other_run = train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="other", **variant))
    other = step_losses(other_run)
    assert len(plain) == len(other) == 4
    assert plain[-1] < plain[0]  # it trained, so later steps compare updated weights too
    assert other == pytest.approx(plain, rel=1e-4)
    passes = read_manifest(other_run)["forward_passes"]
    assert passes["packing"] == variant.get("packing", False)
    assert passes["max_tokens"] == variant.get("batch_tokens", 4 * 512)


# ------------------------------------------------------------------------------------------- label-only logits
def test_label_only_logits_match_full_logits_in_loss_and_gradient_and_skip_unlabelled_rows(
        tinyllama_tiny_model, tinyllama_tokenizer):
    rows = encoded_rows(tinyllama_tokenizer, 4)
    for batch in (collate(rows, tinyllama_tokenizer.pad_token_id),
                  collate_packed([rows[:2], rows[2:]], tinyllama_tokenizer.pad_token_id)):
        count = n_labels(batch)
        mine = lora_model(tinyllama_tiny_model)
        loss = recipe.LabelLoss(mine, fused=False)  # the head as a module (train.fused's kernel: below)
        assert loss.decoder is not None  # the fast path is the one in use
        head_rows = []
        hook = loss.head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape))
        got = loss(**batch) / count
        hook.remove()
        got.backward()
        assert len(head_rows) == 1 and head_rows[0][0] == count  # logits only where a label is
        assert count < batch["input_ids"].numel() / 2  # ... which is a minority of positions here

        ref_model = lora_model(tinyllama_tiny_model)
        ref = ref_model(**batch, use_cache=False).loss  # transformers: full logits, mean over labelled tokens
        ref.backward()
        assert float(got) == pytest.approx(float(ref), rel=FP32_REL)
        assert torch.allclose(lora_grads(mine), lora_grads(ref_model), rtol=1e-4, atol=1e-7)
        fused_model = lora_model(tinyllama_tiny_model)
        fused = recipe.LabelLoss(fused_model)(**batch) / count
        fused.backward()
        assert float(fused) == pytest.approx(float(ref), rel=FP32_REL)
        assert torch.allclose(lora_grads(fused_model), lora_grads(ref_model), rtol=1e-4, atol=1e-7)

        fallback = recipe.LabelLoss(lora_model(tinyllama_tiny_model))
        fallback.decoder = None  # the path for models that post-process logits (softcapping, logit scale)
        with torch.no_grad():
            assert float(fallback(**batch)) / count == pytest.approx(float(ref), rel=FP32_REL)


# ------------------------------------------------------------------------------------------- bf16 path
def test_bf16_base_with_autocast_stays_near_fp32(tinyllama_tiny_model, tinyllama_tokenizer):
    batch = collate(encoded_rows(tinyllama_tokenizer, 4), tinyllama_tokenizer.pad_token_id)
    count = n_labels(batch)

    ref_model = lora_model(tinyllama_tiny_model)
    ref = recipe.LabelLoss(ref_model)(**batch) / count
    ref.backward()

    model = lora_model(tinyllama_tiny_model)
    recipe.keep_base_in_bf16(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trained and all(p.dtype == torch.float32 for p in trained)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = recipe.LabelLoss(model)(**batch) / count
    got.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)
    assert float(got) == pytest.approx(float(ref), rel=BF16_REL)
    g, g_ref = lora_grads(model), lora_grads(ref_model)
    assert torch.nn.functional.cosine_similarity(g, g_ref, dim=0) >= 0.99
    assert torch.linalg.vector_norm(g) == pytest.approx(float(torch.linalg.vector_norm(g_ref)), rel=0.02)


def test_bf16_training_run_follows_fp32_and_records_it(tmp_path, tinyllama_tiny_model):
    fp32_run = train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="fp32", max_steps=6))
    bf16_run = train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="bf16", max_steps=6, autocast_bf16="on"))
    fp32, bf16 = step_losses(fp32_run), step_losses(bf16_run)
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]
    assert bf16 == pytest.approx(fp32, rel=BF16_REL)
    m32, m16 = read_manifest(fp32_run), read_manifest(bf16_run)
    assert (m32["autocast_bf16"], m32["base_bf16"]) == (False, False)
    assert (m16["autocast_bf16"], m16["base_bf16"]) == (True, True)
    assert m16["dtype"] == "float32"  # master (LoRA) weights stay fp32; only the frozen base is bf16


def test_lora_dropout_draws_four_positions_per_random_number_with_dropouts_distribution():
    drop = recipe.LoraDropout(0.05)
    x = torch.randn(4, 128, 576, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    zeroed = (y == 0)
    assert abs(zeroed.float().mean().item() - 0.05) < 0.003  # 294,912 draws: the rate is p
    kept = ~zeroed
    assert torch.allclose(y[kept], x[kept] / 0.95)  # survivors scaled by 1/(1-p): the expectation is x
    assert zeroed.float().mean(dim=(0, 1)).std() < 0.02  # no position is favoured (16-bit words are uniform)
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.95)  # gradient flows through the same mask
    torch.manual_seed(0)
    assert torch.equal(drop(x) == 0, zeroed)  # the global generator: seeded runs and resume repeat their masks
    assert not torch.equal(drop(x) == 0, zeroed)
    drop.eval()
    assert drop(x) is x and recipe.LoraDropout(0.0)(x) is x


def test_train_and_check_put_lora_dropout_on_every_lora_layer(tinyllama_tiny_model):
    from collegeadvisor.models import load_model

    cfg = load_config(None, dict(base_model=str(tinyllama_tiny_model), lora_dropout=0.1))
    model = recipe.lora_model(load_model(str(tinyllama_tiny_model), dtype=torch.float32), cfg)
    drops = [m for m in model.modules() if isinstance(m, recipe.LoraDropout)]
    layers = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)]
    assert drops and len(drops) == len(layers) and all(d.p == 0.1 for d in drops)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    off = recipe.lora_model(load_model(str(tinyllama_tiny_model), dtype=torch.float32),
                            load_config(None, dict(base_model=str(tinyllama_tiny_model), lora_dropout=0.0)))
    assert not any(isinstance(m, recipe.LoraDropout) for m in off.modules())


def test_a_right_padded_pass_runs_without_its_padding_mask_and_each_example_keeps_its_loss(
        tinyllama_tiny_model, tinyllama_tokenizer):
    from collegeadvisor.train.model import right_padded

    rows = encoded_rows(tinyllama_tokenizer, 4)
    batch = collate(rows, tinyllama_tokenizer.pad_token_id)
    assert right_padded(batch["attention_mask"]) and not right_padded(batch["attention_mask"].flip(1))
    loss = recipe.LabelLoss(lora_model(tinyllama_tiny_model))
    seen = []
    hook = loss.decoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")),
                                                  with_kwargs=True)
    with torch.no_grad():
        for i, r in enumerate(rows):
            only = torch.full_like(batch["labels"], IGNORE_INDEX)
            only[i] = batch["labels"][i]
            got = loss(input_ids=batch["input_ids"], labels=only, attention_mask=batch["attention_mask"])
            want = loss(**collate([r], tinyllama_tokenizer.pad_token_id))
            assert float(got) == pytest.approx(float(want), rel=FP32_REL), i
    hook.remove()
    assert seen and all(m is None for m in seen)  # the padding mask never reached the model
