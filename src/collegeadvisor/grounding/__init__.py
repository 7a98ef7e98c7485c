"""Claims in an advisor's answer and their check against the rows it cites.

An answer names its row with a citation "[n]" (the n-th retrieved passage) and each of its sentences names the
field a figure belongs to ("Median debt: $23,456"). Three kinds of claim are read from the text:
- a figure: a money amount, a number of three or more digits, a ratio or a percentage (1-2 digit integers such as
  the "4" of "4 years" are not figures); it belongs to the row cited last before it and to the field named last
  in its clause (FIELD_CUES, most specific first), or the field of the figure before it;
- a yes/no verdict right after the citation: whether graduates out-earn a typical high-school graduate, i.e. the
  sign of the row's earnings premium;
- "no data" for a field: the row must have that field suppressed;
- the row's name right after the citation ("[2] Master's Degree in Social Work at ..."): it must be one of the
  cited row's own names (`row_names`); another retrieved row's name quotes one row under another's name;
- a comparison's winner ("Graduates of X earn more", "The Bachelor's Degree in X pays more"): it must be the cited
  row with the higher median earnings.
A figure needs a citation before it: "(1)", "[I]" or "[1a]" are no citations (the figures after them cite nothing),
and with `expected` (the rows the question resolved to) the answer must cite those rows and no other Scorecard row.

`check` compares every claim with the cited row, field by field, and gives the verdict that eval scores and chat
and serve act on. `Rules` answers the same questions for a partial answer, one token at a time: generation uses it
(generate.GroundedDecoding) so that a figure, verdict or "no data" its row contradicts can't be written at all.
"""

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
)
from collegeadvisor.grounding.rules import (  # noqa: F401
    NO_WORDS,
    Rules,
    VERDICT_WORDS,
    signature,
)
