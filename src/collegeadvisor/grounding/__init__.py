"""Grounded answers: `claims` reads an answer's claims (figures and their fields, verdicts, "no data", row names, a
comparison's winner) and checks them against the rows it cites; `rules` is the same rules one token at a time, for
decoding. The names of both, from here."""

from collegeadvisor.grounding.claims import (  # noqa: F401 (the package's names)
    CITATION,
    Context,
    FIELD_CUES,
    FIELD_NAMES,
    Figure,
    NO_DATA_PHRASE,
    NUMBER,
    PSEUDO_CITATION,
    TEST_VERDICT,
    TEST_WORDS,
    WINNER,
    WINNER_OPEN,
    WINNER_OPENING,
    YES_NO,
    check,
    cited_at,
    claims,
    cue_field,
    digits,
    fallback_answer,
    field_at,
    figures,
    forbidden,
    plain,
    row_names,
    same_value,
    says_no_data,
    value_of,
    winner_sentences,
)
from collegeadvisor.grounding.rules import (  # noqa: F401
    NO_WORDS,
    Rules,
    VERDICT_WORDS,
    signature,
)
