"""The preflight: one broken fixture per check, each asserting its own finding, and clean configs with no errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from collegeadvisor import check
from collegeadvisor.chat_format import IGNORE_INDEX, encode_conversation, end_of_turn_token, format_spec
from collegeadvisor.config import load_config
from collegeadvisor.errors import AdvisorError
from collegeadvisor.models import load_tokenizer
from helpers import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def qa_rows(n=40, answer=None):
    return [{"messages": [
        {"role": "user", "content": f"What do graduates of program {i} earn at school {i % 7}?"},
        {"role": "assistant", "content": answer(i) if answer else f"Graduates earned a median of ${30000 + 37 * i:,}."},
    ]} for i in range(n)]


def make_cfg(tmp_path, model, rows=None, **kw):
    """A config like configs/quickstart.yaml, on a small dataset in tmp_path and a tiny local model."""
    data = write_jsonl(tmp_path / "data.jsonl", qa_rows() if rows is None else rows)
    settings = dict(base_model=str(model), data=str(data), output_dir=str(tmp_path / "runs"))
    settings.update(kw)
    return load_config(QUICKSTART, settings)


def run(tmp_path, model, rows=None, measure=False, **kw):
    return check.run_checks(make_cfg(tmp_path, model, rows, **kw), measure=measure)


def codes(findings, level=None):
    return {f.code for f in findings if level is None or f.level == level}


def only(findings, code):
    found = [f for f in findings if f.code == code]
    assert found, f"no {code} finding in {[str(f) for f in findings]}"
    return found[0]


# ------------------------------------------------------------------------------------------------ clean
def test_clean_quickstart_config_passes_with_every_info_line(tmp_path, tiny_model):
    findings = run(tmp_path, tiny_model, measure=True)
    assert [str(f) for f in findings if f.level != "info"] == []
    assert {"label-share", "histogram", "pad", "ram", "disk", "eta"} <= codes(findings)
    hist = [f for f in findings if f.code == "histogram"]
    assert {f.where for f in hist} == {"train", "val"}
    train = next(f for f in hist if f.where == "train")
    assert sum(c for _, c in train.data["histogram"]) == train.data["report"]["n"] == 39
    assert "covers 99%" in train.message
    eta = only(findings, "eta")
    assert eta.data["step"]["tokens_per_s"] > 0 and eta.data["eta_seconds"] > 0 and "ETA" in eta.message


def test_eta_step_shrinks_to_one_example_on_a_slow_machine(tmp_path, smol_tiny_model, monkeypatch):
    whole = only(run(tmp_path, smol_tiny_model, measure=True), "eta").data["step"]["tokens"]
    monkeypatch.setattr(check.environment, "MEASURE_BUDGET_S", 0.0)
    one = only(run(tmp_path, smol_tiny_model, measure=True), "eta").data["step"]["tokens"]
    assert 0 < one < whole and whole >= 4 * 30  # a micro-batch is batch_size (4) examples of ~35 tokens


def test_print_findings_puts_errors_first_and_draws_histograms(tmp_path, smol_tiny_model, capsys):
    rows = qa_rows(39) + [{"instruction": "Q?", "output": "A median of $1.<|endoftext|>"}]
    findings = run(tmp_path, smol_tiny_model, rows)
    check.print_findings(list(reversed(findings)))
    out = capsys.readouterr().out
    assert out.index("ERROR") < out.index("INFO") and "fix:" in out and "#" in out
    assert out.strip().splitlines()[-1].startswith("preflight: 1 error")


# ------------------------------------------------------------------------------------------------ format
def test_defect1_endoftext_in_tinyllama_data_is_flagged_with_file_line(tmp_path, tinyllama_tiny_model):
    """The seed's hand-formatted training text ended answers with <|endoftext|>; TinyLlama ends turns with </s>."""
    rows = [{"instruction": f"What do graduates of program {i} earn?",
             "output": f"A median of ${30000 + i:,}.<|endoftext|>"} for i in range(30)]
    findings = run(tmp_path, tinyllama_tiny_model, rows)
    f = only(findings, "foreign-scaffolding")
    assert f.level == "error" and f.check == "format"
    assert f.where == f"{tmp_path / 'data.jsonl'}:1" and "'<|endoftext|>'" in f.message and "'</s>'" not in f.message
    assert "ends turns with </s>" in f.message and "30 examples" in f.message and "remove" in f.fix


@pytest.mark.parametrize("marker", ["</s>", "<|user|>", "### Instruction:", "### Response:"])
def test_foreign_scaffolding_in_a_chatml_models_data(tmp_path, smol_tiny_model, marker):
    rows = qa_rows(20) + [{"instruction": "Q?", "output": f"answer {marker} more"}]
    f = only(run(tmp_path, smol_tiny_model, rows), "foreign-scaffolding")
    assert f.data["marker"] == marker and f.where.endswith(":21") and "<|im_end|>" in f.message


def test_tinyllama_flags_chatml_and_its_own_markers_differently(tmp_path, tinyllama_tiny_model):
    rows = qa_rows(10) + [
        {"instruction": "Q?", "output": "<|im_start|>assistant\nA"},
        {"instruction": "Q2?", "output": "A <|user|> B"},
        {"instruction": "Q3?", "output": "A </s> B"},
    ]
    findings = run(tmp_path, tinyllama_tiny_model, rows)
    by_marker = {f.data["marker"]: f.code for f in findings if "marker" in f.data}
    assert by_marker == {"<|im_start|>": "foreign-scaffolding", "<|user|>": "own-role-marker",
                         "</s>": "own-end-of-turn"}
    assert all(f.level == "error" for f in findings if "marker" in f.data)


def test_check_flags_every_control_token_data_validate_refuses_and_the_models_own(tmp_path, tinyllama_tiny_model):
    """One rule (data.prepare): every token `data validate` refuses is an error here too, plus the tokenizer's own
    special tokens, which `data validate` (no tokenizer) cannot know."""
    from collegeadvisor.data.prepare import CONTROL_TOKENS

    tokens = [*CONTROL_TOKENS, "<unk>"]
    rows = qa_rows(10) + [{"instruction": f"Q{i}?", "output": f"A {t} B"} for i, t in enumerate(tokens)]
    findings = run(tmp_path, tinyllama_tiny_model, rows)
    flagged = {f.data["marker"]: f for f in findings if "marker" in f.data}
    assert set(flagged) == set(tokens)
    assert all(f.level == "error" and f.where == f"{tmp_path / 'data.jsonl'}:{11 + tokens.index(t)}"
               for t, f in flagged.items())
    assert flagged["<unk>"].code == "own-special-token" and flagged["<s>"].code == "own-special-token"
    assert flagged["[INST]"].code == "foreign-scaffolding" and flagged["<|im_start|>"].code == "foreign-scaffolding"


def test_template_that_cannot_stop_is_a_format_error(tmp_path, smol_tokenizer):
    from conftest import build_tiny_model

    folder = tmp_path / "model"
    build_tiny_model(smol_tokenizer, folder)
    cfg_file = json.loads((folder / "tokenizer_config.json").read_text())
    cfg_file["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                 "{% if add_generation_prompt %}assistant: {% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg_file))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    f = only(run(tmp_path, folder), "template")
    assert f.level == "error" and "not with a special token" in f.message


@pytest.fixture(scope="module")
def smol(smol_tiny_model):
    return load_tokenizer(str(smol_tiny_model))


CONV = [{"role": "user", "content": "What do nurses earn at Ohio State?"},
        {"role": "assistant", "content": "A median of $65,432."},
        {"role": "user", "content": "And the debt?"},
        {"role": "assistant", "content": "No data."}]


def test_a_correct_example_has_no_findings(smol):
    enc = encode_conversation(smol, CONV)
    assert check.example_findings(smol, CONV, enc.input_ids, enc.labels, "d.jsonl:1") == []


def test_prompt_that_is_not_a_token_prefix(smol):
    enc = encode_conversation(smol, CONV)
    ids = list(enc.input_ids)
    ids[3] = ids[3] + 1
    f = check.example_findings(smol, CONV, ids, enc.labels, "d.jsonl:4")
    assert [x.code for x in f] == ["prompt-not-prefix"] and f[0].where == "d.jsonl:4" and f[0].check == "format"


def test_end_of_turn_token_without_label(smol):
    enc = encode_conversation(smol, CONV)
    eot_id = smol.convert_tokens_to_ids(end_of_turn_token(smol))
    labels = list(enc.labels)
    last = max(i for i, l in enumerate(labels) if l == eot_id)
    labels[last] = IGNORE_INDEX
    f = check.example_findings(smol, CONV, enc.input_ids, labels, "d.jsonl:2")
    assert [x.code for x in f] == ["end-of-turn-unlabelled"] and "turn 2" in f[0].message


def test_reply_without_end_of_turn_token(smol):
    enc = encode_conversation(smol, CONV[:2])
    eot_id = smol.convert_tokens_to_ids(end_of_turn_token(smol))
    keep = [i for i, t in enumerate(enc.input_ids) if not (t == eot_id and enc.labels[i] != IGNORE_INDEX)]
    ids = [enc.input_ids[i] for i in keep]
    labels = [enc.labels[i] for i in keep]
    assert "no-end-of-turn" in codes(check.example_findings(smol, CONV[:2], ids, labels, "d.jsonl:1"))


# ------------------------------------------------------------------------------------------------ masking
def test_defect4_labels_on_the_prompt(smol):
    """No label masking (the seed trained on the whole text): labels equal to input_ids everywhere."""
    enc = encode_conversation(smol, CONV)
    f = check.example_findings(smol, CONV, enc.input_ids, list(enc.input_ids), "d.jsonl:7")
    assert codes(f) == {"prompt-labelled"} and all(x.level == "error" and x.check == "masking" for x in f)
    assert "loss on the instruction" in f[0].message and f[0].where == "d.jsonl:7"


def test_all_labels_masked(smol):
    enc = encode_conversation(smol, CONV[:2])
    f = check.example_findings(smol, CONV[:2], enc.input_ids, [IGNORE_INDEX] * len(enc.input_ids), "d.jsonl:3")
    assert "no-labels" in codes(f, "error") and "trains nothing" in only(f, "no-labels").message


def test_defect4_as_a_user_sets_it_up_prompt_inside_the_answer(tmp_path, smol_tiny_model):
    """An Alpaca text blob pasted as the answer: the prompt sits in the assistant turn and is trained on."""
    rows = [{"messages": [
        {"role": "user", "content": f"What do graduates of program {i} earn at school {i}?"},
        {"role": "assistant", "content": f"### Instruction:\nWhat do graduates of program {i} earn at school {i}?\n\n"
                                         f"### Response:\nA median of ${30000 + i:,}."},
    ]} for i in range(30)]
    findings = run(tmp_path, smol_tiny_model, rows)
    f = only(findings, "prompt-in-answer")
    assert f.level == "error" and f.check == "masking" and "no label masking" in f.message
    assert f.data["count"] == 30 and f.where.startswith(f"{tmp_path / 'data.jsonl'}:")
    assert {"### Instruction:", "### Response:"} <= {x.data.get("marker") for x in findings}


def test_label_share_is_reported(tmp_path, smol_tiny_model):
    findings = run(tmp_path, smol_tiny_model)
    shares = {f.where: f.data["share"] for f in findings if f.code == "label-share"}
    assert set(shares) == {"train", "val"} and all(0.05 < s < 0.9 for s in shares.values())


# ------------------------------------------------------------------------------------------------ length
LONG = " ".join(f"Graduates of this program earned {i} thousand dollars in year {i}." for i in range(30))


def test_defect5_max_length_256_cuts_answers(tmp_path, smol_tiny_model):
    rows = qa_rows(40, answer=lambda i: LONG if i % 3 == 0 else "A median of $40,000.")
    findings = run(tmp_path, smol_tiny_model, rows, max_length=256)
    f = only(findings, "answers-cut")
    assert f.level == "error" and f.where == "max_length" and "max_length 256" in f.message
    assert "dropped from training" in f.message and f.data["share"] > 0.2
    train = next(x for x in findings if x.code == "histogram" and x.where == "train")
    needed = train.data["report"]["max_length_for_99pct"]
    assert needed > 256 and f"raise max_length to {-(-needed // 64) * 64}" in f.fix
    assert dict(train.data["histogram"])[">256"] == len(f.data["wheres"]) > 0


def test_one_cut_answer_in_many_is_below_the_threshold(tmp_path, smol_tiny_model):
    rows = qa_rows(250, answer=lambda i: LONG if i == 0 else "A median of $40,000.")
    findings = run(tmp_path, smol_tiny_model, rows, max_length=256, val_fraction=0.0)
    f = only(findings, "answers-cut")
    assert f.level == "info" and "1 of 250" in f.message and "to keep them all" in f.fix
    f = only(run(tmp_path, smol_tiny_model, rows, max_length=256, val_fraction=0.0, truncation="error"), "answers-cut")
    assert f.level == "error"


def test_max_length_beyond_the_models_positions(tmp_path, smol_tiny_model):
    f = only(run(tmp_path, smol_tiny_model, max_length=4096), "beyond-positions")
    assert f.level == "error" and "1024" in f.message


# ------------------------------------------------------------------------------------------------ setup
def test_defect6_one_epoch_on_a_small_dataset(tmp_path, smol_tiny_model):
    cfg = make_cfg(tmp_path, smol_tiny_model, epochs=1)
    cfg.max_steps = None  # the quickstart config sets a step budget; the seed set epochs
    f = only(check.run_checks(cfg, measure=False), "too-few-epochs")
    assert f.level == "warning" and f.where == "epochs" and "1 epoch(s) over 39 training examples" in f.message
    f = only(run(tmp_path, smol_tiny_model, max_steps=2, grad_accum=4), "too-few-epochs")  # 2 x 4 x 4 of 39
    assert f.where == "max_steps" and "0.80 epochs" in f.message
    assert "too-few-epochs" not in codes(run(tmp_path, smol_tiny_model))  # 60 steps = 24 epochs of 39


def test_learning_rate_rank_and_clipping(tmp_path, smol_tiny_model):
    cfg = make_cfg(tmp_path, smol_tiny_model, learning_rate=2e-5, lora_r=2, lora_alpha=4)
    cfg.max_grad_norm = None
    findings = check.run_checks(cfg, measure=False)
    assert {"lr-range", "rank-range", "no-clipping"} <= codes(findings, "warning")
    assert "2e-05" in only(findings, "lr-range").message and only(findings, "no-clipping").where == "max_grad_norm"
    assert not check.errors(findings)


def test_lora_target_that_matches_nothing(tmp_path, smol_tiny_model):
    f = only(run(tmp_path, smol_tiny_model, lora_target="query_key_value"), "lora-target")
    assert f.level == "error" and "q_proj" in f.fix


def test_pad_equal_to_eos_is_handled_by_our_batching(tmp_path, smol_tiny_model, monkeypatch):
    f = only(run(tmp_path, smol_tiny_model), "pad")
    assert f.level == "info" and "equals EOS: handled" in f.message
    f = only(run(tmp_path, smol_tiny_model, packing=True), "pad")
    assert f.level == "info"

    # a collator that derives labels from `input_ids == pad` (the common bug) loses EOS from the loss
    from collegeadvisor.train import batching

    real = batching.forward_batches

    def naive(rows, pad_id, *a, **k):
        out = real(rows, pad_id, *a, **k)
        for b in out:
            b["labels"][b["input_ids"] == pad_id] = IGNORE_INDEX
        return out

    monkeypatch.setattr(batching, "forward_batches", naive)
    f = only(run(tmp_path, smol_tiny_model), "pad-eats-labels")
    assert f.level == "warning" and "labelled EOS" in f.message


@pytest.mark.parametrize("device", ["mps", "cpu"])
def test_fp16_on_mps_or_cpu_is_an_error(tmp_path, smol_tiny_model, device):
    findings = run(tmp_path, smol_tiny_model, device=device, dtype="fp16")
    f = only(findings, "fp16-off-cuda")
    assert f.level == "error" and f.where == "dtype" and f"fp16 on {device}" in f.message and "NaN" in f.message
    assert "MPS" in f.message and "fp32" in f.fix


# ------------------------------------------------------------------------------------------------ runs
def write_run(root: Path, model: Path, status="complete", base=None, template=None) -> Path:
    tok = load_tokenizer(str(model))
    fmt = format_spec(tok)
    if template:
        fmt["template_sha256"] = template
    run = root / f"run-{status}"
    (run / "adapter").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({
        "status": status, "base_model": {"spec": base or str(model)}, "format": fmt, "error": "loss is nan at step 3"
        if status == "failed" else None, "config": {"learning_rate": 1e-3}, "metrics": {"steps": 10, "final_loss": 1.5},
    }))
    return run


def test_run_of_another_base_model_and_template(tmp_path, smol_tiny_model, tinyllama_tiny_model):
    cfg = make_cfg(tmp_path, smol_tiny_model, learning_rate=2e-4)  # the run's (write_run) is 1e-3
    other = write_run(tmp_path, tinyllama_tiny_model)
    findings = check.run_checks(cfg, run=other, measure=False)
    assert {"run-base-model", "run-template"} <= codes(findings, "error")
    assert str(tinyllama_tiny_model) in only(findings, "run-base-model").message

    same = write_run(tmp_path / "b", smol_tiny_model)
    findings = check.run_checks(cfg, run=same, measure=False)
    assert not [f for f in findings if f.check == "runs" and f.level != "info"]
    assert f"learning_rate 0.001 -> {cfg.learning_rate:g}" in only(findings, "run-settings").message


@pytest.mark.parametrize("status, level", [("failed", "error"), ("paused", "warning"), ("running", "warning")])
def test_run_that_did_not_complete(tmp_path, smol_tiny_model, status, level):
    cfg = make_cfg(tmp_path, smol_tiny_model)
    f = only(check.run_checks(cfg, run=write_run(tmp_path, smol_tiny_model, status=status), measure=False),
             "run-incomplete")
    assert f.level == level and "--resume" in f.fix
    if status == "failed":
        assert "loss is nan" in f.message


def test_folder_that_is_not_a_run(tmp_path, smol_tiny_model):
    f = only(check.run_checks(make_cfg(tmp_path, smol_tiny_model), run=tmp_path, measure=False), "no-manifest")
    assert f.level == "error" and f.where == str(tmp_path) and f.message.startswith("no manifest.json")


def test_run_name_already_taken(tmp_path, smol_tiny_model):
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "manifest.json").write_text("{}")
    f = only(run(tmp_path, smol_tiny_model, run_name="r1"), "run-exists")
    assert f.level == "error" and f.where == "run_name"


# ------------------------------------------------------------------------------------------------ retrieval
def kb_rows(n=12):
    from collegeadvisor.data.scorecard import load_table

    return load_table().head(n)


def small_kb(path, n=12):
    from collegeadvisor.kb import build_kb

    build_kb(path, rows=kb_rows(n), progress=False)
    return path


def trained_on(**changes):
    """A run manifest's "retrieval" section as train writes it for this version."""
    from collegeadvisor.data.scorecard import row_format_id
    from collegeadvisor.models import EMBEDDING_MODEL

    return {"k": 3, "embedder": EMBEDDING_MODEL, "row_format": row_format_id()} | changes


def test_knowledge_base_built_as_the_run_was_trained_is_one_info_line(tmp_path):
    kb = small_kb(tmp_path / "kb")
    findings = check.check_kb(kb, retrieval=trained_on(), table_rows=12)
    assert [(f.code, f.level) for f in findings] == [("kb", "info")]
    assert "12 rows" in findings[0].message and "as the run was trained" in findings[0].message
    assert [f.code for f in check.check_kb(kb, table_rows=12)] == ["kb"]  # --kb-path alone: this version's


def test_missing_or_empty_knowledge_base(tmp_path):
    from collegeadvisor.kb import open_store

    missing = tmp_path / "nowhere"
    f = only(check.check_kb(missing, retrieval=trained_on(), table_rows=12), "kb-missing")
    assert f.level == "error" and f.where == str(missing) and "trained on retrieved rows" in f.message
    assert f.fix == f"build it: collegeadvisor kb build --path {missing}"
    assert not missing.exists()  # checking creates nothing
    (tmp_path / "plain").mkdir()  # a folder, but no Chroma store in it
    only(check.check_kb(tmp_path / "plain", table_rows=12), "kb-missing")
    assert list((tmp_path / "plain").iterdir()) == []
    open_store(tmp_path / "empty")  # a store whose collection holds nothing
    f = only(check.check_kb(tmp_path / "empty", table_rows=12), "kb-empty")
    assert f.level == "error" and f.fix == f"build it: collegeadvisor kb build --path {tmp_path / 'empty'}"


def test_knowledge_base_with_fewer_rows_than_the_table(tmp_path):
    from collegeadvisor.data.scorecard import load_table

    kb = small_kb(tmp_path / "kb")
    f = only(check.check_kb(kb, table_rows=20), "kb-rows")
    assert f.level == "error" and "holds 12 of the table's 20 rows" in f.message
    assert f.fix.endswith(f"collegeadvisor kb build --path {kb}") and "resume" in f.fix
    whole = load_table()["row_id"].nunique()  # by default, against the whole Scorecard table
    assert f"12 of the table's {whole:,} rows" in only(check.check_kb(kb), "kb-rows").message


def test_knowledge_base_of_another_embedder_or_row_format(tmp_path):
    from collegeadvisor.kb import build_kb, open_store

    kb = small_kb(tmp_path / "kb")
    store = open_store(kb)  # as another version would have built it
    store.modify(metadata={"embedder": "bge-small-en-v1.5", "row_format": "0123456789abcdef"})
    findings = check.check_kb(kb, retrieval=trained_on(), table_rows=12)
    assert codes(findings, "error") == {"kb-embedder", "kb-row-format"}
    f = only(findings, "kb-embedder")
    assert "built with embedding model 'bge-small-en-v1.5'; the run was trained with 'all-MiniLM-L6-v2'" in f.message
    assert f.where == str(kb) and "--kb-path NEW_FOLDER" in f.fix
    assert "'0123456789abcdef'" in only(findings, "kb-row-format").message
    with pytest.raises(AdvisorError, match="was built with embedder 'bge-small-en-v1.5'"):
        build_kb(kb, rows=kb_rows(20), progress=False)  # a build would mix two kinds of rows: it refuses
    # a run trained with another row format than this version writes: no knowledge base built now fits it
    f = only(check.check_kb(small_kb(tmp_path / "kb2"), retrieval=trained_on(row_format="fedcba9876543210"),
                            table_rows=12), "run-row-format")
    assert f.level == "error" and "retrain" in f.fix


def test_knowledge_base_built_before_builds_recorded_their_row_format(tmp_path):
    from collegeadvisor.kb import build_kb, open_store
    from collegeadvisor.models import EMBEDDING_MODEL

    kb = small_kb(tmp_path / "kb")
    open_store(kb).modify(metadata={"embedder": EMBEDDING_MODEL})  # what builds recorded before
    f = only(check.check_kb(kb, table_rows=12), "kb-unrecorded")
    assert f.level == "warning" and "row format" in f.message
    build_kb(kb, rows=kb_rows(12), progress=False)  # its documents read as this version writes: stamped
    assert [f.code for f in check.check_kb(kb, retrieval=trained_on(), table_rows=12)] == ["kb"]


def test_a_run_trained_on_retrieval_checks_its_knowledge_base(tmp_path, smol_tiny_model, monkeypatch):
    cfg = make_cfg(tmp_path, smol_tiny_model)
    run = write_run(tmp_path, smol_tiny_model)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps(manifest | {"retrieval": trained_on()}))
    monkeypatch.chdir(tmp_path)
    f = only(check.run_checks(cfg, run=run, measure=False), "kb-missing")  # the default folder, kb_store
    assert f.where == "kb_store" and f.check == "retrieval"
    kb = small_kb(tmp_path / "kb")
    findings = check.run_checks(cfg, run=run, measure=False, kb_path=str(kb))
    assert "kb-rows" in codes(findings, "error") and "kb-missing" not in codes(findings)
    assert only(findings, "chromadb").level == "info"
    plain = write_run(tmp_path / "b", smol_tiny_model)  # no retrieval section, no --kb-path: nothing to check
    assert not [f for f in check.run_checks(cfg, run=plain, measure=False) if f.check == "retrieval"]


def fake_chromadb(tmp_path, init: str) -> str:
    """A folder to put first on the path, holding a `chromadb` package whose __init__ is `init`."""
    package = tmp_path / "fake" / "chromadb"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    return str(tmp_path / "fake")


def test_chromadb_that_fails_on_import_is_not_reported_as_missing(tmp_path):
    path = fake_chromadb(tmp_path, "raise ImportError(\"cannot import name 'Settings' from 'chromadb.config'\")\n")
    f = only(check.check_chromadb(pythonpath=path), "chromadb-broken")
    assert f.level == "error" and f.fix == "pip install --force-reinstall chromadb"
    assert f"is installed ({path}" in f.message and "not installed" not in f.message
    assert "fails on import: ImportError: cannot import name 'Settings'" in f.message


def test_chromadb_that_refuses_the_sqlite3(tmp_path):
    path = fake_chromadb(tmp_path, 'raise RuntimeError("\\033[91mYour system has an unsupported version of sqlite3. '
                                   'Chroma requires sqlite3 >= 3.35.0.\\033[0m")\n')
    f = only(check.check_chromadb(pythonpath=path), "chromadb-sqlite")
    assert f.level == "error" and "refuses this Python's sqlite3" in f.message and "\x1b" not in f.message
    assert "pip install pysqlite3-binary" in f.fix and "3.35 or newer" in f.fix


def test_chromadb_import_that_crashes_cannot_take_the_preflight_down(tmp_path):
    f = only(check.check_chromadb(pythonpath=fake_chromadb(tmp_path, "import os\nos.abort()\n")), "chromadb-broken")
    assert "crashed (signal" in f.message


def test_working_chromadb_is_one_info_line():
    f = only(check.check_chromadb(), "chromadb")
    assert f.level == "info" and "imports and opens a client" in f.message


# ------------------------------------------------------------------------------------------------ environment
def test_defect9_chromadb_missing(tmp_path, smol_tiny_model, monkeypatch):
    real = check.environment.find_spec
    monkeypatch.setattr(check.environment, "find_spec", lambda name, *a: None if name == "chromadb" else real(name, *a))
    findings = run(tmp_path, smol_tiny_model)
    f = only(findings, "missing-package")
    assert f.level == "error" and f.where == "chromadb" and f.fix == "pip install 'chromadb'"
    assert "kb needs" in f.message and len(check.errors(findings)) == 1
    # a user who never builds a knowledge base can leave the kb stage out
    cfg = make_cfg(tmp_path, smol_tiny_model)
    assert not check.errors(check.run_checks(cfg, measure=False, stages=("train", "eval")))


def test_missing_training_package_stops_the_other_checks(tmp_path, smol_tiny_model, monkeypatch):
    real = check.environment.find_spec
    monkeypatch.setattr(check.environment, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    findings = run(tmp_path, smol_tiny_model)
    assert [(f.code, f.where, f.fix) for f in findings] == [("missing-package", "peft", "pip install 'peft'")]


def test_not_enough_disk(tmp_path, smol_tiny_model, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    f = only(run(tmp_path, smol_tiny_model), "disk")
    assert f.level == "error" and f.where == "output_dir" and "needed" in f.message


def test_ram_estimate_against_available(tmp_path, smol_tiny_model, monkeypatch):
    monkeypatch.setattr(check.environment, "memory", lambda: (10 * 2**20, 10 * 2**30))
    f = only(run(tmp_path, smol_tiny_model), "ram")
    assert f.level == "warning" and "available now" in f.message
    monkeypatch.setattr(check.environment, "memory", lambda: (2**20, 2**20))
    f = only(run(tmp_path, smol_tiny_model), "ram")
    assert f.level == "error" and "lower batch_size" in f.fix
    assert f.data["total"] > f.data["activations"] > 0


def test_ram_estimate_grows_with_the_batch(tmp_path, smol_tiny_model):
    small = only(run(tmp_path, smol_tiny_model, batch_size=1, max_length=512), "ram").data
    big = only(run(tmp_path, smol_tiny_model, batch_size=8, max_length=512), "ram").data
    assert big["activations"] == 8 * small["activations"] and big["tokens_per_pass"] == 8 * 512


def test_ram_estimate_shrinks_with_the_share_of_layers_recomputing_their_mlp(tmp_path, smol_tiny_model):
    acts = [only(run(tmp_path, smol_tiny_model, recompute_mlp=share), "ram").data["activations"]
            for share in (0.0, 0.5, 1.0)]
    assert acts[0] > acts[1] > acts[2] > 0 and acts[1] == (acts[0] + acts[2]) / 2


def test_memory_reads_proc_meminfo_without_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    available, total = check.memory()
    assert total and available and 0 < available <= total


# ------------------------------------------------------------------------------------------------ preflight and CLI
def test_preflight_raises_one_line_unless_forced(tmp_path, smol_tiny_model, capsys):
    cfg = make_cfg(tmp_path, smol_tiny_model, rows=qa_rows(20) + [{"instruction": "Q", "output": "A</s>"}])
    with pytest.raises(AdvisorError) as exc:
        check.preflight(cfg, measure=False)
    assert "\n" not in str(exc.value) and str(exc.value).startswith("1 error in preflight")
    assert str(exc.value).endswith("fix them or pass --force") and ":21:" in str(exc.value)
    assert check.errors(check.preflight(cfg, force=True, measure=False))
    assert "ERROR" in capsys.readouterr().out


def _cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "collegeadvisor.cli", "check", *args, "--no-measure"],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_cli_check_exits_1_on_a_broken_dataset_and_0_on_a_clean_one(tmp_path, tinyllama_tiny_model):
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"instruction": f"Q{i}?", "output": f"A{i}.<|endoftext|>"}
                                                     for i in range(20)])
    clean = write_jsonl(tmp_path / "clean.jsonl", qa_rows(30))
    common = ["--config", str(QUICKSTART), "--base-model", str(tinyllama_tiny_model), "--output-dir",
              str(tmp_path / "runs")]
    bad = _cli(*common, "--data", str(broken), cwd=tmp_path)
    assert bad.returncode == 1, bad.stderr
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: 1 error in preflight")
    assert f"{broken}:1" in bad.stderr and "<|endoftext|>" in bad.stderr and "Traceback" not in bad.stderr
    assert "ERROR" in bad.stdout and "fix:" in bad.stdout
    good = _cli(*common, "--data", str(clean), cwd=tmp_path)
    assert good.returncode == 0, good.stderr + good.stdout
    assert "preflight: 0 errors" in good.stdout
    nokb = _cli(*common, "--data", str(clean), "--kb-path", str(tmp_path / "nokb"), cwd=tmp_path)
    assert nokb.returncode == 1 and nokb.stderr.count("\n") == 1 and "Traceback" not in nokb.stderr
    assert f"{tmp_path / 'nokb'}: no knowledge base here" in nokb.stderr
    assert f"collegeadvisor kb build --path {tmp_path / 'nokb'}" in nokb.stdout


def test_cli_check_refuses_a_file_of_one_example_copied_as_data_validate_does(tmp_path, smol_tiny_model, capsys):
    """The dedupe and minimum of data.loaders.unique_examples, the ones `data validate` applies (tests/test_data.py)."""
    from collegeadvisor.cli import main

    copies = write_jsonl(tmp_path / "copies.jsonl", qa_rows(1) * 30)
    common = ["check", "--config", str(QUICKSTART), "--base-model", str(smol_tiny_model), "--output-dir",
              str(tmp_path / "runs"), "--no-measure"]
    assert main([*common, "--data", str(copies)]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert "1 unique example out of 30 (29 duplicates dropped)" in out and "too few to train on" in out
    f = only(check.run_checks(make_cfg(tmp_path, smol_tiny_model, qa_rows(1) * 30), measure=False), "too-few-unique")
    assert f.level == "error" and f.data == {"unique": 1, "examples": 30}
    assert not [f for f in run(tmp_path, smol_tiny_model, qa_rows(2) * 15) if f.code == "too-few-unique"]
