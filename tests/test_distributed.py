"""Data-parallel training on 2 CPU processes (gloo): the ranks see different examples, end with identical adapter
weights, agree on one run directory, and only rank 0 writes the manifest and checkpoints.

Each rank runs `collegeadvisor.train.train` from a small launcher that records, per rank, what it trained on,
what it wrote and its final trainable weights, so the check does not rest on the recipe's own digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collegeadvisor.runs import read_manifest
from helpers import advisor_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

LAUNCHER = r'''
import hashlib, json, os, sys, time
from pathlib import Path

rank = int(os.environ["RANK"])
out = Path(sys.argv[1])
real_strftime = time.strftime
# a rank that starts a second later must still write into rank 0's run directory
time.strftime = lambda fmt, *a: real_strftime(fmt, *a) + (f"-rank{rank}" if fmt.startswith("run-") else "")

from collegeadvisor.config import load_config
from collegeadvisor.train import checkpoint, recipe


def note(kind, value=None):
    with open(out / f"rank{rank}.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": kind, "value": value}) + "\n")


def wrap(owner, name, before):
    real = getattr(owner, name)

    def wrapped(*a, **k):
        before(*a, **k)
        return real(*a, **k)

    setattr(owner, name, wrapped)


wrap(checkpoint, "save", lambda run_dir, step, *a, **k: note("checkpoint", step))
wrap(recipe, "write_manifest", lambda run_dir, m: note("manifest", m["status"]))
wrap(recipe, "passes_for", lambda rows, *a: note("rows", sorted(
    hashlib.sha256(json.dumps([int(t) for t in r["input_ids"]]).encode()).hexdigest()[:12] for r in rows)))


def final_weights(model):
    import torch
    torch.save({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
               out / f"rank{rank}.pt")


wrap(recipe, "adapter_digest", final_weights)
recipe.train(load_config(None, json.loads(sys.argv[2])))
'''


def settings(tmp_path, model, **kw) -> dict:
    data = write_jsonl(tmp_path / "data.jsonl", advisor_rows(48))
    base = dict(base_model=str(model), data=str(data), output_dir=str(tmp_path / "runs"), max_steps=4, batch_size=2,
                grad_accum=2, learning_rate=1e-2, save_every=2, log_every=1, val_fraction=0.1, sample_every=2,
                sample_count=1, sample_max_new_tokens=4, num_threads=1)
    base.update(kw)
    return base


def launch(cmd: list[str], tmp_path: Path, cfg: dict) -> subprocess.CompletedProcess:
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([*cmd, str(script), str(tmp_path), json.dumps(cfg)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def records(tmp_path: Path, rank: int) -> list[dict]:
    path = tmp_path / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(180)
def test_two_gloo_ranks_train_different_examples_into_identical_adapters(tmp_path, tinyllama_tiny_model):
    from safetensors.torch import load_file

    launch([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"], tmp_path,
           settings(tmp_path, tinyllama_tiny_model))

    # one run directory, named by rank 0, though rank 1's clock named it differently
    runs = [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    assert [p.name for p in runs] == [runs[0].name] and runs[0].name.endswith("-rank0")
    run = runs[0]

    # the ranks trained on different examples at every step (the 4 step groups, then validation)
    r0, r1 = ([x["value"] for x in records(tmp_path, rank) if x["kind"] == "rows"] for rank in (0, 1))
    assert len(r0) == len(r1) == 5
    for step in range(4):
        assert not set(r0[step]) & set(r1[step]), step

    # ... and still end with identical, trained adapter weights, equal to the saved adapter
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys() and len(w0) > 0
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
    assert any(float(w.abs().max()) > 0 for n, w in w0.items() if "lora_B" in n)  # B starts at zero: it trained
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == len(w0)
    for name, w in saved.items():
        match = [v for k, v in w0.items() if k.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(match[0].to(w.dtype), w), name

    # only rank 0 writes: the manifest (running ... complete) and the checkpoints at steps 2 and 4
    assert [x for x in records(tmp_path, 1) if x["kind"] != "rows"] == []
    wrote = [(x["kind"], x["value"]) for x in records(tmp_path, 0) if x["kind"] != "rows"]
    assert ("checkpoint", 2) in wrote and ("checkpoint", 4) in wrote and wrote[-1] == ("manifest", "complete")
    m = read_manifest(run)
    assert m["status"] == "complete" and m["world_size"] == 2
    assert m["schedule"]["effective_batch"] == 2 * 2 * 2
    assert len(set(m["ranks"]["adapter_sha256"])) == 1 and len(m["ranks"]["adapter_sha256"]) == 2
    assert len(list((run / "samples.jsonl").read_text().splitlines())) == 2  # rank 0 alone samples, at 2 and 4


@pytest.mark.timeout(180)
def test_accelerate_launch_with_the_documented_ddp_config(tmp_path, tinyllama_tiny_model):
    """The README's multi-GPU command, on CPU: without CUDA the recipe's processes fall back to gloo."""
    config = ROOT / "configs" / "accelerate" / "ddp.yaml"
    launch([str(BIN / "accelerate"), "launch", "--config_file", str(config), "--num_processes", "2",
            "--main_process_port", "0"], tmp_path,
           settings(tmp_path, tinyllama_tiny_model, run_name="acc", sample_every=0, max_steps=2))
    m = read_manifest(tmp_path / "runs" / "acc")
    assert m["status"] == "complete" and m["world_size"] == 2
    digests = m["ranks"]["adapter_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(w0[n], w1[n]) for n in w0)


def test_ddp_config_parses_and_sharding_engines_are_refused_in_one_line():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from collegeadvisor.errors import AdvisorError
    from collegeadvisor.train.recipe import check_parallelism

    ddp = load_config_from_file(str(ROOT / "configs" / "accelerate" / "ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.mixed_precision == "no"  # the recipe picks precision
    for ok in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_parallelism(ok)
    for engine in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(AdvisorError, match=rf"{engine.value} is not supported.*ddp.yaml.*docs/scaling.md"):
            check_parallelism(engine)
