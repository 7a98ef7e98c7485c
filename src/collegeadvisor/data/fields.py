"""The Scorecard's fields and the questions asked of them: one entry each, read by every stage.

- `FIELDS` (a `FieldSpec` per field): its table column, the label and value form a row document writes it in,
  what a sentence calls it and the cue words that say a clause speaks of it, and whether a missing value is written
  as "no data". `data.scorecard` writes and reads rows by it; `grounding` finds a figure's field and checks it by it.
- `KINDS` (a `KindSpec` per question about one row): the field it asks for, its share of the dataset, its question
  templates, the cue words a user's question asks for it by, its answer (and its "no data" answer when the field is
  suppressed) and how eval scores it. The dataset builder (`data.scorecard_qa`), the reference answers
  (`data.scorecard_answers`), resolution (`kb.resolve`), `advise` and eval's metrics read it.

Adding a field or a kind is one entry here plus its tests. Kinds over two or more rows (compare, open) and the
"no data" kind are built from these: `data.scorecard_qa.STRUCTURAL_MIX`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache


@dataclass(frozen=True)
class FieldSpec:
    name: str  # the key answers, documents and checks use ("debt")
    column: str  # the table's column
    label: str  # as a row document writes it; "{horizon}" / "{state}" are filled from the row
    value: str  # how its value is written: money ("$23,456"), ratio ("0.43"), years ("4.5"), count ("45")
    says: str  # how a sentence names it ("median debt")
    cue: str  # regex: a clause of an answer speaks of it
    specificity: int  # cues are tried most specific first ("high-school graduate earnings" is not "earnings")
    no_data: bool = False  # written as "no data" when missing (a student asks about it); else left out
    needs: str | None = None  # a column without which this field is missing too
    unit: str = ""  # written after the value (" years")
    remark: tuple[str, str] | None = None  # written after a value >= 0, < 0 (" (passes the test)")
    no_data_note: str = ""  # written after "no data" (" (suppressed)")

    def label_for(self, horizon: str | None, state: str | None) -> str:
        return self.label.format(horizon=horizon or "some years", state=state or "the state")

    @property
    def bare_label(self) -> str:
        """The label before its first placeholder: how "no data" is written ("Median earnings: no data")."""
        return self.label.split(" {")[0]


# In the order a row document writes them.
FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("completers", "completers_count", "Completers", "count", "completers",
              r"\bcompleters?\b|\bgraduates counted\b", 0),
    FieldSpec("earnings", "earnings", "Median earnings {horizon} after completion", "money", "median earnings",
              r"\bearn|\bsalar|\bincome\b|\bpaid\b|\bpay\b|\bmake\b", 1, no_data=True, needs="earnings_horizon",
              no_data_note=" (suppressed)"),
    FieldSpec("hs_earnings", "earnings_threshold_state", "High-school graduate earnings in {state}", "money",
              "high-school graduate earnings", r"\bhigh[- ]school\b", 5, needs="state"),
    FieldSpec("premium", "earnings_premium_state", "Earnings premium", "money", "earnings premium",
              r"\bpremium\b", 4, no_data=True, remark=(" (passes the test)", " (fails the test)")),
    FieldSpec("debt", "debt_median", "Median debt", "money", "median debt",
              r"\bdebt\b|\bowe\b|\bborrow|\bloans?\b", 2, no_data=True),
    FieldSpec("ratio", "debt_to_earnings_ratio", "Debt-to-earnings", "ratio", "debt-to-earnings ratio",
              r"debt[- ]to[- ](?:earnings|income)|\bratio\b", 6),
    FieldSpec("payback", "debt_payback_years", "Payback", "years", "payback years",
              r"\bpay ?back\b|\byears to repay\b", 3, unit=" years"),
)
FIELD = {f.name: f for f in FIELDS}

# How a value is written, and the pattern that reads it back.
VALUE_PATTERN = {"money": r"-?\$[\d,]+", "ratio": r"\d+\.\d+", "years": r"\d+\.\d+", "count": r"\d+"}


def value_text(form: str, v: float) -> str:
    if form == "money":
        return f"${v:,.0f}" if v >= 0 else f"-${-v:,.0f}"
    if form == "ratio":
        return f"{v:.2f}"
    if form == "years":
        return f"{v:.1f}"
    return f"{int(v)}"


@lru_cache(maxsize=1)
def answer_cues() -> tuple[tuple[str, re.Pattern], ...]:
    """(field, the cue that says a clause of an answer speaks of it), most specific first."""
    ordered = sorted(FIELDS, key=lambda f: -f.specificity)
    return tuple((f.name, re.compile(f.cue, re.I)) for f in ordered)


# ------------------------------------------------------------------------------------------ question kinds
# {what}: "bachelor's in Nursing"; {a_what}: the same with its article; {school}.
# An answer: "{tag}" its citation, "{name}" the row's full name, "{label}" the field's label for the row, "{value}"
# its value; any field's value by its name ("{debt}"), "{earnings_label}", "{horizon}", "{state}", "{suppressed}".
FIGURE_ANSWER = "{tag} {name}. {label}: {value}."
NO_DATA_ANSWER = "{tag} {name}. {bare_label}: no data ({suppressed})."


@dataclass(frozen=True)
class KindSpec:
    name: str  # the example's kind ("debt")
    field: str  # the field it asks for: resolution's answer to "what is asked"
    share: float  # of the dataset's examples
    questions: tuple[str, ...]  # templates
    cue: str  # regex: a user's question asks for it
    specificity: int  # cues are tried most specific first ("worth it vs high school" also says "earn")
    answers: dict[str, str] = field(default_factory=dict)  # sub -> answer; {} for FIGURE_ANSWER under its name
    sub_mix: dict[str, float] = field(default_factory=dict)  # shares of its subs ({} for one sub, its name)
    needs: tuple[str, ...] = ()  # other fields the answer states: the row must have them
    no_data_share: float = 0.0  # share of the "no data" kind asked as this kind (its field suppressed)
    no_data_answer: str = NO_DATA_ANSWER
    suppressed: str | None = None  # the field whose "no data" answers it (default: its own field)
    score: str = "figure"  # how eval scores an answer: figure (the value), verdict (yes / no on the value's sign)
    model_template: int = 0  # the question template advise asks the model in
    topic: str = ""  # what the data covers, said where a question asks for something else
    loose: tuple[str, ...] = ()  # the same question as students type it ({what} "cs bs", {school} "uga")
    follow: tuple[str, ...] = ()  # a follow-up that asks for this field about the row just discussed

    @property
    def subs(self) -> dict[str, float]:
        return self.sub_mix or {self.name: 1.0}

    def answer(self, sub: str) -> str:
        return self.answers.get(sub, FIGURE_ANSWER)


# A verdict kind's subs pick rows by the sign of its field.
VERDICT_SIGN = {"passes": 1, "fails": -1}

KINDS: tuple[KindSpec, ...] = (
    KindSpec(
        "earnings", "earnings", 0.18,
        topic="median earnings after completion",
        questions=(
            "How much do {what} grads from {school} make?",
            "What's the median salary for people who finish the {what} at {school}?",
            "If I do {a_what} at {school}, how much will I earn after graduating?",
            "What do graduates of the {what} program at {school} typically earn?",
            "Median earnings for the {what} at {school}?",
            "I'm thinking about the {what} at {school}. What kind of money do graduates make?",
            "How well paid are {school} graduates with {a_what}?",
            "What are typical earnings after completing {a_what} at {school}?",
            "Does {a_what} from {school} pay well? What do grads earn?",
            "Can you tell me the median income of {what} completers from {school}?",
        ),
        cue=(r"\bearn|salar|\bpay\b|\bpaid\b|\bmake\b|\bmakes\b|\bmaking\b|income|money|wages?\b|compensation"
             r"|\bpaycheck"),
        specificity=0,
        no_data_share=0.40,
        loose=("{school} {what} salary?", "how much do {what} grads make at {school}",
               "what do ppl make after {what} at {school}", "{what} at {school}, pay after graduating?",
               "{school} {what} how much do grads earn", "whats the median income for {what} from {school}"),
        follow=("and the salary?", "what do they make?", "ok and how much do grads earn?"),
    ),
    KindSpec(
        "debt", "debt", 0.10,
        topic="median debt",
        questions=(
            "How much debt do students graduate with from the {what} at {school}?",
            "What's the median student loan debt for the {what} at {school}?",
            "If I finish {a_what} at {school}, how much will I owe?",
            "How much do {what} grads from {school} typically borrow?",
            "Median debt for the {what} at {school}?",
            "I'm worried about loans. What's the typical debt after {a_what} at {school}?",
            "How deep in debt are graduates of the {what} program at {school}?",
            "What do students usually owe after completing the {what} at {school}?",
            "Tell me the median debt for {what} completers at {school}.",
        ),
        cue=r"\bdebt|\bloans?\b|\bowe\b|\bborrow",
        specificity=2,
        no_data_share=0.25,
        loose=("{school} {what} debt?", "how much debt after {what} at {school}",
               "how much will i owe for {what} at {school}", "{what} {school} student loans how much"),
        follow=("what about debt?", "and the debt?", "how much do they owe?"),
    ),
    KindSpec(
        "debt_to_earnings", "ratio", 0.12,
        topic="the debt-to-earnings ratio",
        questions=(
            "What's the debt-to-earnings ratio for the {what} at {school}?",
            "How does debt compare to earnings for the {what} at {school}?",
            "Is the debt from {a_what} at {school} manageable relative to what grads earn?",
            "Debt vs. salary for {what} grads at {school}?",
            "How big is the typical loan compared to income for the {what} at {school}?",
            "For the {what} at {school}, what's median debt divided by median earnings?",
            "Will I be able to handle the loans from {a_what} at {school}, given what grads make?",
            "How does the debt load stack up against pay for {what} graduates of {school}?",
            "Give me the debt-to-income ratio for the {what} at {school}.",
        ),
        cue=(r"\bratio\b|debt[- ](?:to|vs\.?|versus)[- ](?:earnings|income|salary|pay)|manageable|relative to "
             r"(?:what|pay|earnings|income|salary)|stack up against|handle the (?:loans|debt)|afford (?:the )?"
             r"(?:loans|debt)"),
        specificity=3,
        answers={"debt_to_earnings": (
            "{tag} {name}. Debt-to-earnings ratio: {ratio} (median debt {debt} against median earnings {earnings} "
            "{horizon} after completion).")},
        needs=("earnings", "debt"),
        no_data_share=0.15,
        loose=("{what} at {school} debt to income ratio?", "can i handle the loans from {what} at {school}",
               "{school} {what} debt vs salary"),
        follow=("and the debt to earnings ratio?", "what about debt vs pay?"),
        no_data_answer="{tag} {name}. Debt-to-earnings ratio: no data (its {missing} is {suppressed}).",
    ),
    KindSpec(
        "premium", "premium", 0.20,
        topic="how earnings compare with a typical high-school graduate's in the state",
        questions=(
            "Is {a_what} at {school} worth it compared to just high school?",
            "Do {what} grads from {school} earn more than high school graduates?",
            "Would I make more with {a_what} from {school} than with only a high school diploma?",
            "Does the {what} at {school} pay off versus not going to college?",
            "Do graduates of the {what} at {school} out-earn a typical high-school grad in their state?",
            "Is there an earnings premium for the {what} at {school}?",
            "Will {a_what} at {school} beat what I'd earn with just a high school diploma?",
            "Is going to {school} for {a_what} better, money-wise, than stopping after high school?",
            "Compared with a typical high school graduate, do {what} completers from {school} earn more?",
        ),
        cue=(r"high[- ]?school|\bhs\b|\bged\b|worth it|worth the|pays? off (?:vs|versus|compared|over|than|against)"
             r"|premium|out-?earn|more than (?:people|ppl|someone|those|folks|somebody|a person)"
             r"|without (?:a )?(?:college|degree)|not going to college"),
        # The answer opens with its verdict (Yes / No, or Unknown when the row has no premium): the first word
        # fixes the answer's form, and decoding admits only the verdict the cited row supports.
        specificity=4,
        answers={
            "passes": ("{tag} Yes. {name}. {earnings_label}: {earnings}. High-school graduate earnings in {state}: "
                       "{hs_earnings}. Earnings premium: {premium}, so it passes the test: graduates out-earn a "
                       "typical high-school graduate."),
            "fails": ("{tag} No. {name}. {earnings_label}: {earnings}. High-school graduate earnings in {state}: "
                      "{hs_earnings}. Earnings premium: {premium}, so it fails the test: graduates earn less than a "
                      "typical high-school graduate."),
        },
        sub_mix={"passes": 2 / 3, "fails": 1 / 3},  # ~9% of rows fail; oversampled so "No" is learned and measured
        needs=("earnings", "hs_earnings"),
        no_data_share=0.20, suppressed="earnings",
        no_data_answer=("{tag} Unknown. {name}. Median earnings: no data ({suppressed}), so the Scorecard can't tell "
                        "whether it pays more than a high-school diploma."),
        score="verdict",
        loose=("is {what} at {school} worth it vs just high school", "do {school} {what} grads earn more than ppl "
               "with only a hs diploma", "{what} {school} worth it compared to high school?"),
        follow=("is it worth it vs high school?", "do they out-earn high school grads?"),
        # "Is a ... worth it compared to just high school?" (0) drew figures after "Unknown ... no data" in 4 of 4
        # suppressed rows tried; "Do ... grads from ... earn more than high school graduates?" (1) in none.
        model_template=1,
    ),
    KindSpec(
        "completers", "completers", 0.04,
        topic="the number of graduates counted",
        questions=(
            "How many students complete the {what} at {school}?",
            "How many people graduate from the {what} at {school}?",
            "How big is the {what} program at {school}? How many finish it?",
            "How many {what} graduates does {school} have?",
            "Number of completers for the {what} at {school}?",
            "How many grads did the {what} at {school} count?",
        ),
        # below earnings: "the median income of ... completers" asks for earnings
        cue=(r"\bhow many\b(?:\W+[\w'/-]+){0,14}?\W+"
             r"(?:students|people|grads|graduates|completers|finish|complete|graduate)\b"
             r"|\bnumber of (?:grads|graduates|students|completers)\b|\bhow big is\b"),
        specificity=-1,
        no_data_share=0.05,
        loose=("how many ppl finish {what} at {school}", "how many grads does {school} {what} have"),
        follow=("how many finish it?", "and how many graduates?"),
        no_data_answer="{tag} {name}. Completers: no data (not reported for this row).",
    ),
)
KIND = {k.name: k for k in KINDS}
KIND_OF_FIELD = {k.field: k for k in KINDS}


def covers() -> str:
    """What the data reports, in a sentence (`KindSpec.topic`, in registry order)."""
    topics = [k.topic for k in KINDS]
    return ("For each school, program and credential, the College Scorecard reports "
            f"{', '.join(topics[:-1])} and {topics[-1]}.")


@dataclass(frozen=True)
class Topic:
    """A topic students ask about that the Scorecard's rows don't hold: resolution finds it by its cue and the reply
    names it; the dataset asks its questions ({school}) so the model learns the same reply."""
    name: str  # as the reply names it ("tuition and costs")
    cue: str  # regex: a question asks about it (with none of the KINDS' cues)
    questions: tuple[str, ...]


UNCOVERED: tuple[Topic, ...] = (
    Topic("tuition and costs", r"tuition|cost of attendance|sticker price|\bfees?\b|\bcosts?\b|\bprice\b|expensive",
          ("how much is tuition at {school}", "whats the cost of attendance for {school}?",
           "is {school} expensive", "{school} tuition per year?")),
    Topic("admissions", r"admission|acceptance rate|admit rate|get in(?:to)?\b|selectiv|\bapply\b|application"
                        r"|admitted",
          ("what's the acceptance rate at {school}", "how hard is it to get into {school}?",
           "{school} admission requirements")),
    Topic("test scores", r"\bsat\b|\bact scores?\b|\bgpa\b|test scores?",
          ("what sat score do i need for {school}", "average gpa at {school}?")),
    Topic("campus housing and student life", r"housing|dorms?\b|residence hall|room and board|meal plan|campus life|"
                                             r"roommate|\bclubs?\b|dining|\bfood\b|party|parties|nightlife|student life",
          ("how's the campus housing at {school}", "are the dorms at {school} any good?",
           "what's student life like at {school}")),
    Topic("rankings", r"\brank(?:ed|ing|ings)?\b|prestig|reputation",
          ("how is {school} ranked?", "is {school} prestigious")),
    Topic("graduation and retention rates", r"graduation rate|retention|drop ?out",
          ("what's the graduation rate at {school}?", "do a lot of people drop out of {school}")),
    Topic("financial aid and scholarships", r"financial aid|scholarship|\bgrants?\b|fafsa",
          ("does {school} give good financial aid?", "scholarships at {school}?")),
    Topic("sports", r"football|basketball|athletic|\bsports?\b", ("is {school} good at football",)),
    Topic("campus safety", r"safety|\bcrime|\bsafe\b", ("is {school} safe?", "crime near {school} campus")),
    Topic("class sizes and faculty", r"class size|student[- ]to[- ]faculty|professors?|faculty|teachers are",
          ("what are class sizes like at {school}", "are the professors at {school} good?")),
    Topic("location and weather", r"weather|climate|parking|\bcity like\b",
          ("what's the weather like at {school}", "is parking bad at {school}?")),
)


@lru_cache(maxsize=1)
def question_cues() -> tuple[tuple[str, re.Pattern], ...]:
    """(field, the cue that says a user's question asks for it), most specific first."""
    return tuple((k.field, re.compile(k.cue, re.I)) for k in sorted(KINDS, key=lambda k: -k.specificity))


def suppressed_field(kind: KindSpec, values: dict) -> str:
    """The field whose "no data" answers a question of `kind` about a row with these values (`row_values`)."""
    if kind.suppressed:
        return kind.suppressed
    if FIELD[kind.field].no_data:
        return kind.field
    return next((f for f in kind.needs if values.get(f) is None), kind.field)
