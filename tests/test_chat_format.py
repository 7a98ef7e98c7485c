import pytest

from collegeadvisor.chat_format import (
    IGNORE_INDEX, encode_conversation, encode_prompt, end_of_turn_token, format_spec, render_text, segments,
    stop_token_ids, with_context,
)
from collegeadvisor.errors import TemplateError
from conftest import tinyllama_reference

SINGLE = [
    {"role": "user", "content": "What is the admission rate at Stanford University?"},
    {"role": "assistant", "content": "About 4%."},
]
MULTI = [
    {"role": "system", "content": "You are a college advisor."},
    {"role": "user", "content": "What do nursing graduates earn at Ohio State University?"},
    {"role": "assistant", "content": "Graduates earned a median of $65,432 four years after completion."},
    {"role": "user", "content": "And the median debt?"},
    {"role": "assistant", "content": "The College Scorecard has no data for this program."},
]


@pytest.mark.parametrize("conv", [SINGLE, MULTI], ids=["single", "multi"])
def test_prompt_ids_are_prefix_of_training_ids(tokenizer, conv):
    full = encode_conversation(tokenizer, conv)
    for i, m in enumerate(conv):
        if m["role"] == "assistant":
            prompt = encode_prompt(tokenizer, conv[:i])
            assert full.input_ids[: len(prompt)] == prompt
            # the first trained token is the first token after the prompt
            assert full.labels[len(prompt) - 1] == IGNORE_INDEX and full.labels[len(prompt)] != IGNORE_INDEX


@pytest.mark.parametrize("conv", [SINGLE, MULTI], ids=["single", "multi"])
def test_labels_cover_exactly_the_assistant_replies_and_eos(tokenizer, conv):
    enc = encode_conversation(tokenizer, conv)
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    trained = [t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX]
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(enc.input_ids, enc.labels))
    replies = [m["content"] for m in conv if m["role"] == "assistant"]
    # each reply is followed by a labelled end-of-turn token, and nothing else is labelled
    assert trained.count(eot_id) == len(replies)
    assert trained[-1] == eot_id
    labelled_text = tokenizer.decode(trained)
    assert all(r in labelled_text for r in replies)
    # no prompt word is labelled
    for m in conv:
        if m["role"] != "assistant":
            assert m["content"] not in labelled_text


def test_eos_labelled_even_though_pad_equals_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # both SmolLM2 and TinyLlama ship this way
    enc = encode_conversation(tokenizer, SINGLE)
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    assert eot_id in [l for l in enc.labels if l != IGNORE_INDEX]


def test_tinyllama_renders_exactly_like_the_reference(tinyllama_tokenizer):
    ref = tinyllama_reference()
    tok = tinyllama_tokenizer
    assert render_text(tok, SINGLE[:1], add_generation_prompt=True) == ref["rendered_examples"]["prompt_for_generation"]
    assert render_text(tok, SINGLE) == ref["rendered_examples"]["training_text"]
    enc = encode_conversation(tok, SINGLE)
    # the same ids the tokenizer gives the whole text, BOS included, so segmenting changed nothing
    assert enc.input_ids == tok(ref["rendered_examples"]["training_text"])["input_ids"]
    assert enc.input_ids[0] == ref["tokenizer"]["bos_token_id"]
    assert end_of_turn_token(tok) == "</s>" and stop_token_ids(tok) == [2]


def test_smollm2_chatml_default_system_and_im_end(smol_tokenizer):
    tok = smol_tokenizer
    text = render_text(tok, SINGLE)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert end_of_turn_token(tok) == "<|im_end|>"
    enc = encode_conversation(tok, SINGLE)
    assert enc.input_ids == tok.apply_chat_template(SINGLE, tokenize=True, return_dict=False)
    # the newline after <|im_end|> belongs to the template, not to the reply: masked
    assert enc.labels[-1] == IGNORE_INDEX and enc.labels[-2] == tok.convert_tokens_to_ids("<|im_end|>")


def test_truncation_is_reported_not_silent(tokenizer):
    enc = encode_conversation(tokenizer, SINGLE)
    cut = encode_conversation(tokenizer, SINGLE, max_length=len(enc.input_ids) - 3)
    assert cut.answer_cut and len(cut.input_ids) == len(enc.input_ids) - 3
    assert not encode_conversation(tokenizer, SINGLE, max_length=len(enc.input_ids)).answer_cut


def test_context_round_trips_through_the_template(tokenizer):
    passages = ["Ohio State University: median earnings $65,432.", "Kent State University: no data."]
    conv = with_context(SINGLE, passages)
    text = render_text(tokenizer, conv)
    assert all(p in text for p in passages)
    enc = encode_conversation(tokenizer, conv)
    prompt = encode_prompt(tokenizer, conv[:-1])
    assert enc.input_ids[: len(prompt)] == prompt
    assert all(p not in tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX]) for p in passages)


def test_template_that_cannot_be_split_is_an_error(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    # renders the last message differently from earlier ones: prefixes do not extend each other
    tok.chat_template = (
        "{% for m in messages %}{% if loop.last %}<|im_start|>LAST {{ m['content'] }}<|im_end|>"
        "{% else %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
    )
    with pytest.raises(TemplateError, match="cannot be split"):
        encode_conversation(tok, MULTI)


def test_template_without_end_of_turn_token_is_an_error(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    # Alpaca-style: the reply is followed by plain text, never by a special token, so the model cannot learn to stop
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% else %}### Response:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"
    )
    with pytest.raises(TemplateError, match="never learns to stop"):
        encode_conversation(tok, SINGLE)


def test_format_spec_records_template_and_tokens(tokenizer):
    spec = format_spec(tokenizer)
    assert spec["chat_template"] == tokenizer.chat_template and len(spec["template_sha256"]) == 64
    assert spec["eos"]["id"] == tokenizer.eos_token_id and spec["end_of_turn"]["id"] in spec["stop_token_ids"]


def test_segments_alternate(tokenizer):
    pieces = segments(tokenizer, MULTI)
    assert [t for _, t in pieces] == [False, True, False, True, False]
