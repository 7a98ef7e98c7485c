"""The words of the advisor's dataset: question templates and the fixed answers (no figures in these)."""

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

# {what}: "bachelor's in Nursing"; {a_what}: the same with its article; {school}.
TEMPLATES = {
    "earnings": [
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
    ],
    "debt": [
        "How much debt do students graduate with from the {what} at {school}?",
        "What's the median student loan debt for the {what} at {school}?",
        "If I finish {a_what} at {school}, how much will I owe?",
        "How much do {what} grads from {school} typically borrow?",
        "Median debt for the {what} at {school}?",
        "I'm worried about loans. What's the typical debt after {a_what} at {school}?",
        "How deep in debt are graduates of the {what} program at {school}?",
        "What do students usually owe after completing the {what} at {school}?",
        "Tell me the median debt for {what} completers at {school}.",
    ],
    "debt_to_earnings": [
        "What's the debt-to-earnings ratio for the {what} at {school}?",
        "How does debt compare to earnings for the {what} at {school}?",
        "Is the debt from {a_what} at {school} manageable relative to what grads earn?",
        "Debt vs. salary for {what} grads at {school}?",
        "How big is the typical loan compared to income for the {what} at {school}?",
        "For the {what} at {school}, what's median debt divided by median earnings?",
        "Will I be able to handle the loans from {a_what} at {school}, given what grads make?",
        "How does the debt load stack up against pay for {what} graduates of {school}?",
        "Give me the debt-to-income ratio for the {what} at {school}.",
    ],
    "premium": [
        "Is {a_what} at {school} worth it compared to just high school?",
        "Do {what} grads from {school} earn more than high school graduates?",
        "Would I make more with {a_what} from {school} than with only a high school diploma?",
        "Does the {what} at {school} pay off versus not going to college?",
        "Do graduates of the {what} at {school} out-earn a typical high-school grad in their state?",
        "Is there an earnings premium for the {what} at {school}?",
        "Will {a_what} at {school} beat what I'd earn with just a high school diploma?",
        "Is going to {school} for {a_what} better, money-wise, than stopping after high school?",
        "Compared with a typical high school graduate, do {what} completers from {school} earn more?",
    ],
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
SUPPRESSED = "suppressed for privacy: too few graduates were counted"
NO_CONTEXT_ANSWER = (
    "I answer only from College Scorecard rows, and none were retrieved for this question. For each school, program "
    "and credential the Scorecard reports median earnings after completion, median debt, the debt-to-earnings ratio "
    "and how earnings compare with a typical high-school graduate's in the state. Name a school and a program, and "
    "I'll look them up."
)
NOT_COVERED = ("The retrieved College Scorecard rows don't cover the {name}, so I can't answer that from them. Ask "
               "about a school and program as the Scorecard lists them.")

# Answers about one row, by (kind, asked-as): "{tag}" is its citation, "{name}" the credential, program and school;
# the other fields are the row's values as its document writes them (`row_values`). Every figure follows its field's
# label, the form `grounding` reads and generation constrains.
ANSWERS = {
    ("earnings", "earnings"): "{tag} {name}. {earnings_label}: {earnings}.",
    ("debt", "debt"): "{tag} {name}. Median debt: {debt}.",
    ("debt_to_earnings", "debt_to_earnings"): (
        "{tag} {name}. Debt-to-earnings ratio: {ratio} (median debt {debt} against median earnings {earnings} "
        "{horizon} after completion)."),
    # A premium answer opens with its verdict (Yes / No, or Unknown when the row has no premium): the first word fixes
    # the answer's form, and decoding admits only the verdict the cited row supports. The figures it follows from
    # come after, and the test's wording agrees with them.
    ("premium", "passes"): (
        "{tag} Yes. {name}. {earnings_label}: {earnings}. High-school graduate earnings in {state}: {hs_earnings}. "
        "Earnings premium: {premium}, so it passes the test: graduates out-earn a typical high-school graduate."),
    ("premium", "fails"): (
        "{tag} No. {name}. {earnings_label}: {earnings}. High-school graduate earnings in {state}: {hs_earnings}. "
        "Earnings premium: {premium}, so it fails the test: graduates earn less than a typical high-school "
        "graduate."),
    ("no_data", "earnings"): "{tag} {name}. Median earnings: no data ({suppressed}).",
    ("no_data", "debt"): "{tag} {name}. Median debt: no data ({suppressed}).",
    ("no_data", "premium"): (
        "{tag} Unknown. {name}. Median earnings: no data ({suppressed}), so the Scorecard can't tell whether it pays "
        "more than a high-school diploma."),
    ("no_data", "debt_to_earnings"): "{tag} {name}. Debt-to-earnings ratio: no data (its {missing} is {suppressed}).",
}
