"""The words of the advisor's dataset beyond the kinds about one row (`data.fields`): comparison and open-credential
question templates and the fixed answers (no figures in these)."""

import json
from functools import lru_cache
from importlib import resources

from collegeadvisor.data.fields import covers

SHORT_CREDENTIAL = {
    "Bachelor's Degree": "bachelor's",
    "Associate's Degree": "associate degree",
    "Master's Degree": "master's",
    "Doctoral Degree": "doctorate",
    "Undergraduate Certificate or Diploma": "certificate",
    "Graduate/Professional Certificate": "graduate certificate",
    "First Professional Degree": "professional degree",
    "Post-baccalaureate Certificate": "post-bacc certificate",
}

# Questions over two or more rows (the kinds about one row are in `data.fields.KINDS`).
TEMPLATES = {
    # {school_a}, {school_b}: two schools, same program and credential
    "schools": [
        "Which pays more for {a_what}: {school_a} or {school_b}?",
        "Do {what} grads earn more from {school_a} or from {school_b}?",
        "I'm choosing between {school_a} and {school_b} for {a_what}. Which one's graduates make more?",
        "{school_a} vs {school_b}: whose {what} graduates have higher median earnings?",
        "Where do {what} graduates earn more, {school_a} or {school_b}?",
        "Compare earnings for the {what} at {school_a} and {school_b}.",
        "Should I do my {what} at {school_a} or {school_b} if I care about salary?",
        "Which school's {what} leads to bigger paychecks, {school_a} or {school_b}?",
    ],
    # {what_a}, {what_b}: two programs at one {school}
    "programs": [
        "At {school}, which pays more: the {what_a} or the {what_b}?",
        "Do {school} grads earn more with {a_what_a} or {a_what_b}?",
        "I'm torn between the {what_a} and the {what_b} at {school}. Which has better earnings?",
        "{school}: {what_a} vs {what_b}, which one's graduates make more?",
        "Which program at {school} leads to higher median earnings, the {what_a} or the {what_b}?",
        "Compare earnings for the {what_a} and the {what_b} at {school}.",
        "If salary matters most, should I pick the {what_a} or the {what_b} at {school}?",
        "Which earns more at {school}: {what_a} graduates or {what_b} graduates?",
    ],
    # {program} at {school}, the credential left open
    "open": [
        "What do {program} graduates of {school} earn?",
        "How much do people who study {program} at {school} make?",
        "What are median earnings for {program} at {school}?",
        "I want to study {program} at {school}. What do graduates earn?",
        "How well does {program} at {school} pay off in earnings?",
        "Median salary for {program} grads from {school}?",
    ],
}
# The questions over two or more rows as students type them ({what}: "cs bs"; {school}: "uga").
LOOSE_TEMPLATES = {
    "schools": [
        "{what}: {school_a} or {school_b}, which one's grads make more?",
        "{school_a} vs {school_b} for {what}, who earns more",
        "which pays more for {what}, {school_a} or {school_b}",
        "{what} at {school_a} or {school_b}? salary",
    ],
    "programs": [
        "at {school}, {what_a} or {what_b}? which pays more",
        "{school}: {what_a} vs {what_b} salary",
        "{what_a} or {what_b} at {school}, which one makes more money",
    ],
    "open": [
        "{school} {program} salary?",
        "what do {program} grads make at {school}",
        "how much do ppl make after {program} at {school}",
    ],
}
# How students write each credential (the resolver reads them: tests/test_scorecard_talk.py checks it).
CREDENTIAL_SLANG = {
    "Bachelor's Degree": ("bs", "ba", "bachelors", "undergrad", "bachelor's degree"),
    "Master's Degree": ("masters", "ms", "ma", "master's"),
    "Doctoral Degree": ("phd", "doctorate"),
    "Associate's Degree": ("associates", "associate's", "aa"),
    "Undergraduate Certificate or Diploma": ("cert", "certificate"),
    "Graduate/Professional Certificate": ("grad cert", "graduate certificate"),
    "First Professional Degree": ("professional degree",),
    "Post-baccalaureate Certificate": ("post bacc cert", "postbaccalaureate certificate"),
}
# Follow-ups that change the school, the credential or the program of the row just discussed.
FOLLOW_UPS = {
    "school": ("and at {school}?", "what about {school}?", "ok and {school}?", "how about at {school}"),
    "credential": ("and the {credential}?", "what about the {credential}?", "and for a {credential}?"),
    "program": ("and {program}?", "what about {program}?", "and for {program} there?"),
}
SUPPRESSED = "suppressed for privacy: too few graduates were counted"
NO_CONTEXT_ANSWER = (f"I answer only from College Scorecard rows, and none were retrieved for this question. {covers()} "
                     "Name a school and a program, and I'll look them up.")
NOT_COVERED = ("The retrieved College Scorecard rows don't cover the {name}, so I can't answer that from them. Ask "
               "about a school and program as the Scorecard lists them.")

# The fixed replies: the answers that need no figure (advise gives them without the model; the dataset trains the
# model to give them too, for where it answers alone). `data.scorecard_answers` fills them in.
NO_ROW = "The College Scorecard has no {what} for {school}."
NO_ROW_NEAREST = " What it lists there instead: {listed}"
UNKNOWN_SCHOOL = ('The College Scorecard has no school named "{school}". Check the spelling, or write the '
                  "school's full name and its state.")
AMBIGUOUS = ('Several schools in the College Scorecard go by "{name}": {listed}{more}. Which one do you mean? Add its '
             "full name or its state.")
OFF_TOPIC = "The College Scorecard data I answer from doesn't cover {topic}{where}. {covers} Ask me about one of those."
ASK_PROGRAM = ("Which program at {school}? Name one, and a credential such as a bachelor's or a master's, and I'll "
               "look up its College Scorecard row.")
ASK_SCHOOL = "Which school? Name one, and I'll look up its College Scorecard row for {program}."


@lru_cache(maxsize=1)
def alias_table() -> dict[str, dict]:
    """How people write schools, programs, credentials and words (`aliases.json`, kept as data): the resolver
    matches questions with it, and the dataset writes questions with it."""
    text = resources.files("collegeadvisor.data").joinpath("aliases.json").read_text(encoding="utf-8")
    return {kind: entries for kind, entries in json.loads(text).items() if not kind.startswith("_")}
