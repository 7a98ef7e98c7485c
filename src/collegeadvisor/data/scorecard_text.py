"""The words of the advisor's dataset beyond the kinds about one row (`data.fields`): comparison and open-credential
question templates and the fixed answers (no figures in these)."""

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
SUPPRESSED = "suppressed for privacy: too few graduates were counted"
NO_CONTEXT_ANSWER = (f"I answer only from College Scorecard rows, and none were retrieved for this question. {covers()} "
                     "Name a school and a program, and I'll look them up.")
NOT_COVERED = ("The retrieved College Scorecard rows don't cover the {name}, so I can't answer that from them. Ask "
               "about a school and program as the Scorecard lists them.")
