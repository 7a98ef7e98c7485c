"""Resolving what people write (kb.resolve): schools, programs, credentials and fields, and follow-ups."""

import pytest

from collegeadvisor.data.fields import KINDS
from collegeadvisor.data.scorecard_answers import templates

from collegeadvisor.data.scorecard import load_table
from collegeadvisor.kb.resolve import aliases, resolve_conversation, resolve_turn


def _school(text: str) -> tuple[str, ...]:
    found = resolve_turn(text).schools
    return tuple(u[1] for u in found[0].units) if found else ()


def test_every_alias_names_a_real_school_or_program():
    table = load_table()
    schools = set(table["inst_name"])
    programs = {str(p).rstrip(".") for p in table["cip_desc"].dropna()}
    table_aliases = aliases()
    assert not {k: v for k, v in table_aliases["schools"].items() if v not in schools}
    named = {k: [v] if isinstance(v, str) else v for k, v in table_aliases["programs"].items()}
    assert not {k: v for k, v in named.items() if not set(v) <= programs}


@pytest.mark.parametrize("text, school", [
    ("slp at umn, masters", "University of Minnesota-Twin Cities"),  # "u" + the state's code
    ("uga's marketting bs", "University of Georgia"),  # possessive, typo beside it
    ("and at ucsd?", "University of California-San Diego"),  # generated initialism
    ("kinesology at fsu?", "Florida State University"),  # an initialism many share: the far bigger school
    ("acounting masters at njit", "New Jersey Institute of Technology"),
    ("ou norman chemistry", "University of Oklahoma-Norman Campus"),  # the alias table
    ("psych at k-state", "Kansas State University"),
    ("pitt poli sci", "University of Pittsburgh-Pittsburgh Campus"),
    ("miami oxford finance", "Miami University-Oxford"),
    ("masters in EE at portland st", "Portland State University"),  # "st" spelled out
    ("criminal justice at vanderbuilt", "Vanderbilt University"),  # a typo in the school
    ("housing at kent state", "Kent State University at Kent"),  # "X at Campus" means the main campus
    ("econ at Ohio State University", "Ohio State University-Main Campus"),
    ("history bachelors at alabama tuscaloosa", "The University of Alabama"),  # a state, then its city
    ("how about at u of m twin cities", "University of Minnesota-Twin Cities"),  # a common initialism + campus
])
def test_schools_as_people_write_them(text, school):
    assert _school(text) == (school,)


@pytest.mark.parametrize("text, program", [
    ("slp at umn", "Communication Disorders Sciences and Services"),
    ("im considering Syracuse for school admin", "Educational Administration and Supervision"),
    ("masters in EE at northeastern", "Electrical, Electronics, and Communications Engineering"),
    ("bme phd at ucsd", "Biomedical/Medical Engineering"),  # a program alias beats an initialism
    ("do ou norman chemisty grads earn more", "Chemistry"),  # typo
    ("uga marketting", "Marketing"),
    ("kinesology at fsu", "Sports, Kinesiology, and Physical Education/Fitness"),
    ("bachelors in criminal justice at vanderbilt", "Criminal Justice and Corrections"),  # rare words
    ("poli sci ba at pitt", "Political Science and Government"),
    ("if i do ed admin phd at michigan st", "Educational Administration and Supervision"),
    ("uw seattle mannagement information systems bs", "Management Information Systems and Services"),  # not "management"
    ("med school at wisconsin madison, whats the median salary", "Medicine"),  # a professional school by its name
])
def test_programs_as_people_write_them(text, program):
    assert resolve_turn(text).programs[0][0] == program


@pytest.mark.parametrize("text, levels", [
    ("slp at umn, masters", ("5",)), ("uga marketing bs", ("3",)), ("bme phd at ucsd", ("6",)),
    ("an associates in nursing at ucla", ("2",)), ("chemistry grads vs only a hs diploma (BS) at uga", ("3",)),
])
def test_credentials_as_people_write_them(text, levels):
    assert resolve_turn(text).levels == levels


@pytest.mark.parametrize("text, field", [
    ("what's the pay after cs at ucla", "earnings"), ("how much will I owe after cs at ucla", "debt"),
    ("do cs grads at ucla earn more than ppl with only a hs diploma", "premium"),
    ("is cs at ucla worth it", "premium"), ("debt to income ratio for cs at ucla", "ratio"),
    ("What do graduates of the Bachelor's Degree in Nursing Administration at UCLA typically earn?", "earnings"),
])
def test_the_field_asked_for(text, field):
    assert resolve_turn(text).field == field


def test_a_topic_the_data_lacks_and_a_school_it_does_not_hold():
    assert resolve_turn("how's the campus housing at kent state").off_topic == "campus housing and student life"
    assert resolve_turn("tuition for cs at ucla?").off_topic == "tuition and costs"
    assert resolve_turn("what's the pay after cs at ucla, and is tuition high?").off_topic is None  # in scope
    unknown = resolve_turn("what do grads of hogwarts university in nursing make")
    assert unknown.unknown_school == "hogwarts university" and not unknown.schools


def test_a_shared_name_is_ambiguous_until_a_state_narrows_it():
    assert len(resolve_turn("nursing at columbia college").schools[0].units) > 1
    assert [u[2] for u in resolve_turn("nursing at columbia college in missouri").schools[0].units] == ["MO"]
    later = resolve_conversation([{"role": "user", "content": "nursing at columbia college"},
                                  {"role": "user", "content": "the one in missouri"}])
    assert [u[2] for u in later.schools[0].units] == ["MO"]


def test_a_follow_up_changes_only_what_it_names():
    turns = ["how much do ppl make after a computer science bachelors at georgia tech", "and at ucla?",
             "what about debt?", "and the master's?"]
    messages, seen = [], []
    for text in turns:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "(an answer)"}]
        r = resolve_conversation(messages)
        seen.append((r.schools[0].units[0][1], r.programs[0][0], r.levels, r.field))
    assert seen == [
        ("Georgia Institute of Technology-Main Campus", "Computer Science", ("3",), "earnings"),
        ("University of California-Los Angeles", "Computer Science", ("3",), "earnings"),
        ("University of California-Los Angeles", "Computer Science", ("3",), "debt"),
        ("University of California-Los Angeles", "Computer Science", ("5",), "debt"),
    ]


def test_two_schools_and_two_programs_each_with_its_own_credential():
    r = resolve_turn("masters in EE: Northeastern or portland st, which one's grads make more?")
    assert [s.units[0][1] for s in r.schools] == ["Northeastern University", "Portland State University"]
    r = resolve_turn("At Ohio State, the bachelor's in Economics or the master's in Finance?")
    assert [p[0] for p in r.programs] == ["Economics", "Finance and Financial Management Services"]
    assert r.program_levels == [("3",), ("5",)]


def test_assistant_turns_and_injected_text_are_not_read_as_what_was_asked():
    r = resolve_conversation([{"role": "user", "content": "cs bachelors at ucla"},
                              {"role": "assistant", "content": "[1] Master's Degree in Nursing at Yale University."}])
    assert r.schools[0].units[0][1] == "University of California-Los Angeles" and r.programs[0][0] == "Computer Science"


@pytest.mark.parametrize("kind, field", [(k.name, k.field) for k in KINDS] + [("open", "earnings")])
def test_every_question_the_dataset_asks_resolves_to_its_field_row_and_credential(kind, field):
    what = "Undergraduate Certificate or Diploma in Medical Assisting"  # "or" and "Diploma" inside a credential
    for template in templates(kind, kind):
        question = template.format(what=what, a_what=f"an {what}", school="Mount Saint Mary's University",
                                   program="Nursing")
        r = resolve_turn(question)
        assert r.field == field, question
        assert [u[1] for u in r.schools[0].units] == ["Mount Saint Mary's University"], question  # possessive kept
        assert len(r.programs) == 1, question
        if kind != "open":
            assert r.levels == ("1",), question
