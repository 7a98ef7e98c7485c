"""`collegeadvisor data preview`: tokens coloured by label, in the terminal and as HTML."""

import re

from collegeadvisor.chat_format import encode_conversation, end_of_turn_token
from collegeadvisor.cli import main
from collegeadvisor.config import load_config
from collegeadvisor.data import preview
from collegeadvisor.models import load_tokenizer
from helpers import write_jsonl

ROWS = [
    {"instruction": "What do nursing graduates earn at Ohio State University?",
     "output": "Graduates earned a median of $65,432 four years after completion."},
    {"messages": [{"role": "user", "content": "Is the debt worth it?"}, {"role": "assistant", "content": "Yes."},
                  {"role": "user", "content": "And the median debt?"},
                  {"role": "assistant", "content": "No data for this program."}]},
    {"instruction": "Third?", "output": "Third answer."},
    {"instruction": "Fourth?", "output": "Fourth answer."},
]


def cfg_for(tmp_path, model, **kw):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    return load_config(None, dict(base_model=str(model), data=str(data), **kw))


def test_tokens_are_classified_from_the_labels(tmp_path, tiny_model):
    tok = load_tokenizer(str(tiny_model))
    eot = end_of_turn_token(tok)
    examples = preview.preview_examples(cfg_for(tmp_path, tiny_model), n=2)
    assert [e["where"].rsplit(":", 1)[1] for e in examples] == ["1", "2"]
    for ex in examples:
        kinds = [k for _, k, _, _ in ex["tokens"]]
        assert kinds.count("trained") + kinds.count("eot") == ex["n_trained"]
        assert all((k in ("trained", "eot")) == (label != -100) for _, k, _, label in ex["tokens"])
        eots = [t for t, k, _, _ in ex["tokens"] if k == "eot"]
        assert eots and all(t.strip() == eot for t in eots)
    second = examples[1]
    assert [k for _, k, _, _ in second["tokens"]].count("eot") == 2  # one per assistant turn
    trained = "".join(t for t, k, _, _ in examples[0]["tokens"] if k in ("trained", "eot"))
    masked = "".join(t for t, k, _, _ in examples[0]["tokens"] if k == "masked")
    assert "65,432" in trained and "Ohio State" in masked and "Ohio State" not in trained


def test_token_texts_rebuild_the_rendered_text(tmp_path, tiny_model):
    tok = load_tokenizer(str(tiny_model))
    conv = [{"role": "user", "content": "What do graduates earn?"}, {"role": "assistant", "content": "A median of $1."}]
    ids = encode_conversation(tok, conv).input_ids
    assert "".join(preview.token_texts(tok, ids)) == tok.decode(ids)


def test_tokens_past_max_length_are_marked_cut(tmp_path, smol_tiny_model):
    ex = preview.preview_examples(cfg_for(tmp_path, smol_tiny_model, max_length=16), n=1)[0]
    kinds = [k for _, k, _, _ in ex["tokens"]]
    assert kinds[16:] == ["cut"] * (len(kinds) - 16) and "cut" not in kinds[:16]
    assert "past max_length 16" in preview._summary(ex)


def test_unlabelled_end_of_turn_is_shown_as_such():
    kinds = preview.classify([5, 6, 2, 7], [-100, 6, -100, -100], eot_id=2)
    assert kinds == ["masked", "trained", "eot-masked", "masked"]


def test_html_page_and_terminal_output(tmp_path, smol_tiny_model, capsys):
    out = tmp_path / "p.html"
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert main(["data", "preview", "--base-model", str(smol_tiny_model), "--data", str(data), "--n", "2",
                 "--html", str(out)]) == 0
    page = out.read_text()
    assert page.count('class="tok eot" title=') == 3  # example 1: one reply; example 2: two (legend has no title)
    text = re.sub(r"<[^>]+>", "", page.split("<pre>", 1)[1])
    assert "&lt;|im_end|&gt;" in text and "median of $65,432 four years" in text and "Third answer" not in text
    assert 'title="id 2 · label 2 · eot"' in page
    term = capsys.readouterr().out
    assert "65,432" in term and "legend" in term and f"HTML: {out}" in term
    assert "d.jsonl:1: " in term and "trained" in term
    # not a terminal: runs are marked instead of coloured
    assert "«Graduates earned a median of $65,432 four years after completion.»⟪<|im_end|>⟫" in term


def test_preview_without_data_is_one_clear_error(tmp_path, smol_tiny_model, capsys):
    assert main(["data", "preview", "--base-model", str(smol_tiny_model)]) == 1
    assert "nothing to preview" in capsys.readouterr().err
