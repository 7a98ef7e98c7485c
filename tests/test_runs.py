"""A run's match with a base model and template: one function (runs.run_mismatches) that loading refuses on and
check reports."""

import pytest

from collegeadvisor.errors import ManifestError
from collegeadvisor.models import load_tokenizer
from collegeadvisor.runs import load_run, read_manifest, run_mismatches


def test_a_run_matches_its_own_base_model_and_template(trained_run, tinyllama_tiny_model):
    m = read_manifest(trained_run)
    tok = load_tokenizer(str(tinyllama_tiny_model))
    assert run_mismatches(m, m["base_model"]["spec"], str(tinyllama_tiny_model), tok.chat_template) == []


def test_another_base_model_weights_or_template(trained_run, tinyllama_tiny_model, smol_tiny_model):
    m = read_manifest(trained_run)
    spec = m["base_model"]["spec"]
    assert [x.what for x in run_mismatches(m, str(smol_tiny_model))] == ["base_model"]
    assert run_mismatches(m, str(smol_tiny_model))[0].trained == spec
    changed = m | {"base_model": m["base_model"] | {"config_sha256": "0" * 64}}
    bad = run_mismatches(changed, spec, str(tinyllama_tiny_model))
    assert [(x.what, x.key, x.trained) for x in bad] == [("weights", "config_sha256", "0" * 64)]
    bad = run_mismatches(m, chat_template=load_tokenizer(str(smol_tiny_model)).chat_template)
    assert [(x.what, x.trained) for x in bad] == [("template", m["format"]["template_sha256"])]


def test_load_run_refuses_another_base_model(trained_run, smol_tiny_model):
    with pytest.raises(ManifestError, match="its adapter only fits its own base model"):
        load_run(trained_run, base_model=str(smol_tiny_model))
