"""The advisor's instruction dataset, built from College Scorecard rows the way RAFT (Zhang et al., 2024) builds
grounded examples: a question, the retrieved rows it is answered from, and an answer that cites its row.

- The right row sits among hard distractors (the same school with another program, the same program at another
  school, the same school and program with another credential), mostly first, sometimes lower, as retrieval
  places it at inference.
- In a share of examples the right row is missing: the answer says that the rows don't cover the question.
- "No data" questions ask about a suppressed row among distractors that carry figures: the answer says no data.
- Questions that leave the credential open are answered with up to three matching rows, each by its credential.
- A few questions come with no rows at all: the answer states no figure and asks for a school and program.
- A share is then asked the way students write (`data.scorecard_talk`): loose wording, follow-ups, and turns
  answered by the fixed replies advise gives (a row the school lacks, an unknown or ambiguous school, a topic the
  data doesn't cover). Held-out questions keep the templated wording.

Every answer cites its row as "[n]" and names the field of each figure ("Median debt: $23,456"), the form that
`grounding` checks and generation constrains. Deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from collegeadvisor.data.fields import FIELD, FIELDS, KINDS, UNCOVERED, VERDICT_SIGN
from collegeadvisor.data.scorecard import (
    _row_ids,
    load_table,
    row_document,
    row_format_id,
    row_records,
)
from collegeadvisor.data.scorecard_answers import (
    answer_text,
    question_text,
    reference_for,
    row_name,
    row_source,
    templates,
)
from collegeadvisor.data.scorecard_talk import FIXED_MIX, FOLLOW_SHARE, LOOSE_SHARE, converse
from collegeadvisor.data.scorecard_text import (
    AMBIGUOUS,
    CREDENTIAL_SLANG,
    FOLLOW_UPS,
    LOOSE_TEMPLATES,
    NO_CONTEXT_ANSWER,
    NO_ROW,
    NOT_COVERED,
    OFF_TOPIC,
    TEMPLATES,
    UNKNOWN_SCHOOL,
    alias_table,
)
from collegeadvisor.errors import AdvisorError, DataError
from collegeadvisor.fsutil import atomic_write_json, atomic_write_jsonl
from collegeadvisor.models import EMBEDDING_MODEL

# Kinds whose answers need more than one figure or a choice of label get more examples than their share of
# questions would suggest: a short run sees each often enough to learn its form. The kinds about one row and their
# shares are `data.fields.KINDS`; these are the kinds built from them.
STRUCTURAL_MIX = {"no_data": 0.15, "compare": 0.15, "open": 0.10}
_SHARES = {k.name: k.share for k in KINDS} | STRUCTURAL_MIX
KIND_MIX = {k: v / sum(_SHARES.values()) for k, v in _SHARES.items()}  # shares of the whole, summing to 1
# "No data" questions, by the kind they are asked as (the row has its field suppressed), largest first.
NO_DATA_MIX = {k.name: k.no_data_share for k in sorted(KINDS, key=lambda k: -k.no_data_share) if k.no_data_share}
COMPARE_MIX = {"schools": 0.5, "programs": 0.5}
NOT_COVERED_SHARE = 0.10  # of grounded single-row examples: the right row is left out of the context
NO_CONTEXT_SHARE = 0.04  # of all training examples: no rows at all
FIRST_SHARE = 0.7  # the right row comes first in this share of contexts, second or third in the rest
# Retrieval ranks the same school and program at other credentials close to the asked row (their documents differ in
# a few words): k=3 on the full knowledge base put such rows in 60% of the contexts of 226 held-out single-row
# questions. This share of contexts lists them first, as at inference; the rest mix the three kinds of neighbour.
SAME_PROGRAM_FIRST = 0.6
MAX_PASSAGES = 3  # rows in a context, as retrieval gives at inference (k): they fit max_length 512
# Contexts of the asked rows alone, as answers read them where resolution found the rows and no neighbours are added
# (advise.plan(neighbours=False): a prompt of ~205 tokens instead of ~363); the rest carry hard distractors.
ASKED_ONLY_SHARE = 0.3
NEEDED = [
    "unitid", "inst_name", "state", "control", "cip_code", "cip_desc", "credential_level", "credential_desc",
    "earnings_horizon", *(f.column for f in FIELDS),
]


def builder_id() -> str:
    """A fingerprint of what this builder writes for a seed (the kinds, their words and shares, the row format): a
    dataset built by another version is rebuilt rather than trained on (`dataset_is_current`)."""
    parts = (KINDS, STRUCTURAL_MIX, NO_DATA_MIX, COMPARE_MIX, TEMPLATES, NO_CONTEXT_ANSWER, NOT_COVERED,
             NOT_COVERED_SHARE, NO_CONTEXT_SHARE, FIRST_SHARE, SAME_PROGRAM_FIRST, MAX_PASSAGES, ASKED_ONLY_SHARE,
             row_format_id(),
             LOOSE_SHARE, FOLLOW_SHARE, FIXED_MIX, LOOSE_TEMPLATES, CREDENTIAL_SLANG, FOLLOW_UPS, UNCOVERED, NO_ROW,
             UNKNOWN_SCHOOL, AMBIGUOUS, OFF_TOPIC, sorted(alias_table()["schools"].items()),
             sorted(alias_table()["programs"].items()))
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:16]


def dataset_is_current(out_dir: Path) -> bool:
    """Whether out_dir holds a dataset this builder wrote (its `dataset.json` names this builder)."""
    try:
        said = json.loads((Path(out_dir) / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return said.get("builder") == builder_id() and (Path(out_dir) / "scorecard.jsonl").is_file()


def retrieval_spec(k: int = MAX_PASSAGES) -> dict[str, Any]:
    """What a run trained on this dataset reads: the manifest records it, check and the knowledge base match it."""
    return {"k": k, "embedder": EMBEDDING_MODEL, "row_format": row_format_id()}


def _check(df, n_examples: int, n_heldout: int) -> None:
    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise DataError(f"the College Scorecard table lacks the column(s) {', '.join(missing)}")
    if n_examples < 1:
        raise AdvisorError(f"n_examples must be at least 1, got {n_examples}")
    if n_heldout < 0:
        raise AdvisorError(f"n_heldout must be 0 or more, got {n_heldout}")


def _split(n: int, shares: dict[str, float]) -> dict[str, int]:
    """n split by shares, largest remainder first, summing to exactly n."""
    raw = {k: n * s / sum(shares.values()) for k, s in shares.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: out[k] - raw[k])[: n - sum(out.values())]:
        out[k] += 1
    return out


def _codes(values) -> np.ndarray:
    import pandas as pd  # not at import: training reads retrieval_spec from here, and pandas costs ~70 MB

    return pd.factorize(values)[0]


def _keys(df) -> dict[str, np.ndarray]:
    """Integer codes of the groupings the builder needs, one per row."""
    program = df["cip_desc"].astype(str) + "|" + df["credential_desc"].astype(str)
    return {
        "school": _codes(df["unitid"].astype(str)),
        "program": _codes(df["cip_code"].astype(str) + ":" + df["credential_level"].astype(str)),
        "school_cip": _codes(df["unitid"].astype(str) + ":" + df["cip_code"].astype(str)),
        "inst": _codes(df["inst_name"].astype(str)),
        "progname": _codes(program),
        "name": _codes(df["inst_name"].astype(str) + "|" + program),
        "open_name": _codes(df["inst_name"].astype(str) + "|" + df["cip_desc"].astype(str)),
    }


def _pools(df, keys) -> dict[tuple[str, str], np.ndarray]:
    """Boolean masks of the rows each (kind, asked-as) can be asked about. Rows whose school, program and
    credential read the same as another row's are never asked about: their question would be ambiguous."""
    import pandas as pd  # see _codes

    named = ~pd.Series(keys["name"]).duplicated(keep=False).to_numpy()
    present = {f.name: _present(df, f) for f in FIELDS}
    earn = present["earnings"] & named
    # open questions: a school + program offered at 2-3 credentials under one name, at least one with earnings
    group = pd.Series(keys["open_name"])
    size = group.map(group.value_counts()).to_numpy()
    n_school_cip = pd.Series(keys["school_cip"]).groupby(keys["open_name"]).transform("nunique").to_numpy()
    open_ok = (size >= 2) & (size <= MAX_PASSAGES) & (n_school_cip == 1) & named
    first = ~group.duplicated().to_numpy()
    any_earn = pd.Series(earn).groupby(keys["open_name"]).transform("any").to_numpy()
    pools = {("compare", "schools"): earn, ("compare", "programs"): earn, ("open", "open"): open_ok & first & any_earn}
    for k in KINDS:
        asked = named & present[k.field]
        for f in k.needs:
            asked = asked & present[f]
        value = df[FIELD[k.field].column].fillna(0).to_numpy()
        for sub in k.subs:
            sign = VERDICT_SIGN.get(sub)
            pools[(k.name, sub)] = asked if sign is None else asked & (np.sign(value) == sign)
        if k.no_data_share:
            suppressed = k.suppressed or k.field
            pools[("no_data", k.name)] = named & ~present[suppressed]
    return pools


def _present(df, f) -> np.ndarray:
    """Rows whose document states field f (`row_values`)."""
    out = df[f.column].notna().to_numpy()
    return out & df[f.needs].notna().to_numpy() if f.needs else out


def _heldout_mask(df, seed: int, n_heldout: int, earn: np.ndarray, keys) -> np.ndarray:
    """Rows set aside for held-out questions, by a seeded hash of school and program (all credentials of a
    school's program fall on one side, so an open question's rows are all held out or all not)."""
    import pandas as pd  # see _codes

    if n_heldout == 0:
        return np.zeros(len(df), dtype=bool)
    share = min(0.5, max(0.02, 4 * n_heldout / max(1, int(earn.sum()))))
    key = hashlib.sha256(f"collegeadvisor-heldout-{seed}".encode()).hexdigest()[:16]
    unit = (df["unitid"].astype(str) + ":" + df["cip_code"].astype(str)).to_numpy()
    u = pd.util.hash_array(unit, hash_key=key) / 2.0**64
    return u < share


def _units(n: int) -> dict[tuple[str, str], int]:
    counts = _split(n, KIND_MIX)
    units = {}
    for k in KINDS:
        units |= {(k.name, s): c for s, c in _split(counts[k.name], k.subs).items()}
    units |= {("no_data", s): c for s, c in _split(counts["no_data"], NO_DATA_MIX).items()}
    units |= {("compare", s): c for s, c in _split(counts["compare"], COMPARE_MIX).items()}
    return units | {("open", "open"): counts["open"]}


def _group(codes: np.ndarray, rows: np.ndarray):
    order = rows[np.argsort(codes[rows], kind="stable")]
    return order, codes[order]


def _members(group, code) -> np.ndarray:
    order, sorted_codes = group
    return order[np.searchsorted(sorted_codes, code, "left"): np.searchsorted(sorted_codes, code, "right")]


def _draw(rng, pool: np.ndarray, need: int, n_templates: int) -> list[tuple[tuple[int, ...], int]]:
    """`need` (rows, template) picks: distinct rows first; a row comes back only with another template."""
    if need == 0 or len(pool) == 0:
        return []
    rounds = min(n_templates, -(-need // len(pool)))
    perm = rng.permutation(pool)
    base = rng.integers(n_templates, size=len(perm))
    rows = np.tile(perm, rounds)[:need]
    tmpl = (np.tile(base, rounds) + np.repeat(np.arange(rounds), len(perm)))[:need] % n_templates
    return [((int(r),), int(t)) for r, t in zip(rows, tmpl)]


def _pairs(rng, pool, keys, earn, sub: str, need: int) -> list[tuple[tuple[int, int], int]]:
    """Pairs of rows with different earnings: the same program at two schools, or two programs at one school."""
    group_key, differ = ("program", keys["inst"]) if sub == "schools" else ("school", keys["progname"])
    group = _group(keys[group_key], pool)
    out, seen = [], set()
    for a in rng.permutation(pool) if need else ():
        cands = _members(group, keys[group_key][a])
        cands = cands[(differ[cands] != differ[a]) & (earn[cands] != earn[a])]
        if not len(cands):
            continue
        pair = (int(a), int(rng.choice(cands)))
        if pair not in seen and pair[::-1] not in seen:
            seen.add(pair)
            out.append((pair, int(rng.integers(len(TEMPLATES[sub])))))
            if len(out) == need:
                break
    return out


def _open_rows(keys, pool: np.ndarray, allowed: np.ndarray) -> dict[int, tuple[int, ...]]:
    """Open question anchor -> every row of its school + program (its credentials)."""
    group = _group(keys["open_name"], allowed)
    return {int(a): tuple(int(r) for r in _members(group, keys["open_name"][a])) for a in pool}


# ------------------------------------------------------------------------------------------ examples
def _examples(df, keys, pools, part: np.ndarray, n: int, rng, label: str) -> list[dict[str, Any]]:
    """n questions about rows in `part`, in the KIND_MIX, no question twice: {kind, sub, rows, question}."""
    earn = df["earnings"].to_numpy()
    plans = {}
    for (kind, sub), need in _units(n).items():
        pool = np.flatnonzero(pools[(kind, sub)] & part)
        want = need + need // 20 + 3 if need else 0  # a margin for questions that read the same
        if kind == "compare":
            plans[(kind, sub)] = (need, _pairs(rng, pool, keys, earn, sub, want))
        elif kind == "open":
            picks = _draw(rng, pool, want, len(TEMPLATES["open"]))
            rows_of = _open_rows(keys, np.array([rows[0] for rows, _ in picks], dtype=int), np.flatnonzero(part))
            plans[(kind, sub)] = (need, [(rows_of[rows[0]], t) for rows, t in picks])
        else:
            plans[(kind, sub)] = (need, _draw(rng, pool, want, len(templates(kind, sub))))
    recs = row_records(df, [r for _, cands in plans.values() for rows, _ in cands for r in rows])
    out, seen = [], set()
    for (kind, sub), (need, cands) in plans.items():
        got = 0
        for rows, template in cands:
            if got == need:
                break
            question = question_text(kind, sub, [recs[r] for r in rows], template, rng)
            if question in seen:
                continue
            seen.add(question)
            out.append({"kind": kind, "sub": sub, "rows": tuple(rows), "question": question})
            got += 1
        if got < need:
            raise DataError(
                f"the College Scorecard table has too few {label} rows for {need} '{kind}' questions ({sub}): "
                f"found {got}; use the full table or ask for fewer examples"
            )
    return [out[i] for i in rng.permutation(len(out))]


def _distractors(rng, rows: tuple[int, ...], n: int, keys, groups, allowed: np.ndarray, has_data) -> list[int]:
    """n hard distractors for `rows`: the same school and program at another credential, other programs at the
    same school, the same program at other schools (rows with figures first when `has_data`), then any rows."""
    names = keys["name"][list(rows)]
    near = []
    for key, group in zip(("school_cip", "school", "program"), groups):
        c = np.unique(np.concatenate([_members(group, keys[key][r]) for r in rows]))
        c = c[~np.isin(keys["name"][c], names)]
        if has_data is not None and len(c):
            c = np.concatenate([rng.permutation(c[has_data[c]]), rng.permutation(c[~has_data[c]])])
        else:
            c = rng.permutation(c)
        near.append([int(x) for x in c])
    picks: list[int] = []
    if rng.random() < SAME_PROGRAM_FIRST:  # as retrieval ranks them: the near-identical rows of other credentials
        picks += near[0][:n]
    for _ in range(n - len(picks)):  # round robin over the three kinds of neighbour, in a random order each time
        for source in rng.permutation(3):
            cand = next((x for x in near[source] if x not in picks), None)
            if cand is not None:
                picks.append(cand)
                break
    for c in rng.choice(allowed, size=min(len(allowed), 8 * n), replace=False) if len(picks) < n else ():
        if len(picks) == n:
            break
        if int(c) not in picks and keys["name"][c] not in names:
            picks.append(int(c))
    return picks


def _place(rng, truth: list[int], others: list[int]) -> list[int]:
    """The right rows among the distractors: first in FIRST_SHARE of contexts, else second or third."""
    if len(truth) > 1:  # compare and open: the asked rows first, in a random order, as retrieval ranks them
        return [*rng.permutation(truth).tolist(), *others]
    at = 0 if rng.random() < FIRST_SHARE else int(rng.integers(1, len(others) + 1)) if others else 0
    return others[:at] + truth + others[at:]


def _context(rng, ex: dict, covered: bool, keys, groups, allowed, has_data) -> list[int]:
    rows = list(ex["rows"])
    if covered and rng.random() < ASKED_ONLY_SHARE:
        return _place(rng, rows, [])
    n_other = max(0, MAX_PASSAGES - len(rows)) if covered else MAX_PASSAGES
    others = _distractors(rng, ex["rows"], n_other, keys, groups, allowed,
                          has_data if ex["kind"] == "no_data" else None)
    return _place(rng, rows, others) if covered else others


def _finish(df, ex: dict, ctx_rows: list[int] | None, recs: dict[int, dict], covered: bool) -> dict[str, Any]:
    """An example's context documents and answer (kind not_in_context / no_context when the rows don't answer)."""
    asked = [recs[r] for r in ex["rows"]]
    if ctx_rows is None:
        return ex | {"kind": "no_context", "answer": NO_CONTEXT_ANSWER, "context": [],
                     "source": row_source(asked[0]) | {"asked": ex["kind"]}}
    context = [row_document(recs[r]) for r in ctx_rows]
    if not covered:
        return ex | {"kind": "not_in_context", "answer": NOT_COVERED.format(name=row_name(asked[0])), "context": context,
                     "source": row_source(asked[0]) | {"asked": ex["kind"]}}
    cite = {recs[r]["row_id"]: i for i, r in enumerate(ctx_rows, 1)}
    return ex | {"ctx_rows": ctx_rows, "answer": answer_text(ex["kind"], ex["sub"], asked, cite), "context": context,
                 "context_ids": [str(recs[r]["row_id"]) for r in ctx_rows], **reference_for(ex["kind"], ex["sub"], asked)}


def _ground(df, examples, keys, allowed: np.ndarray, rng, no_context: set[int], not_covered: set[int]) -> list[dict]:
    groups = tuple(_group(keys[k], allowed) for k in ("school_cip", "school", "program"))
    has_data = df["earnings"].notna().to_numpy()
    ctx = {i: None if i in no_context else _context(rng, ex, i not in not_covered, keys, groups, allowed, has_data)
           for i, ex in enumerate(examples)}
    recs = row_records(df, [r for i, ex in enumerate(examples) for r in (*ex["rows"], *(ctx[i] or []))])
    return [_finish(df, ex, ctx[i], recs, i not in not_covered) for i, ex in enumerate(examples)]


def build_scorecard_dataset(out_dir: Path, n_examples: int = 8000, n_heldout: int = 500, seed: int = 0,
                            table=None) -> dict[str, Any]:
    """Write `scorecard.jsonl` (chat training examples, each with the `context` rows it is answered from) and
    `heldout.jsonl` (questions about rows no training example uses, with reference answer, figure and context)
    under out_dir; return stats."""
    df = load_table() if table is None else table.reset_index(drop=True)
    _check(df, n_examples, n_heldout)
    if "row_id" not in df.columns:
        df = df.assign(row_id=_row_ids(df))
    keys = _keys(df)
    pools = _pools(df, keys)
    held = _heldout_mask(df, seed, n_heldout, pools[("earnings", "earnings")], keys)
    train = _examples(df, keys, pools, ~held, n_examples, np.random.default_rng([seed, 0]), "training")
    heldout = _examples(df, keys, pools, held, n_heldout, np.random.default_rng([seed, 1]), "held-out")

    rng = np.random.default_rng([seed, 2])
    single = [i for i, ex in enumerate(train) if ex["kind"] not in ("compare", "open")]
    picked = rng.permutation(single)
    n_none = round(NO_CONTEXT_SHARE * len(train))
    no_context = {int(i) for i in picked[:n_none]}
    not_covered = {int(i) for i in picked[n_none:n_none + round(NOT_COVERED_SHARE * len(single))]}
    train = _ground(df, train, keys, np.flatnonzero(~held), rng, no_context, not_covered)
    train = converse(df, train, np.flatnonzero(~held), np.random.default_rng([seed, 3]))
    heldout = _ground(df, heldout, keys, np.arange(len(df)), rng, set(), set())

    out_dir = Path(out_dir)
    train_path, heldout_path = out_dir / "scorecard.jsonl", out_dir / "heldout.jsonl"
    atomic_write_jsonl(train_path, (
        {"messages": ex.get("messages") or [{"role": "user", "content": ex["question"]},
                                            {"role": "assistant", "content": ex["answer"]}],
         "kind": ex["kind"], "source": ex["source"] | ({"loose": True} if ex.get("loose") else {}),
         "context": ex["context"]}
        for ex in train
    ))
    atomic_write_jsonl(heldout_path, (
        {k: ex[k] for k in ("question", "answer", "numeric", "values", "yes", "kind", "source", "context",
                            "context_ids") if k in ex}
        for ex in heldout
    ))
    atomic_write_json(out_dir / "dataset.json", {"builder": builder_id(), "seed": seed, "examples": len(train),
                                                  "heldout": len(heldout)})
    return {
        "examples": len(train),
        "kinds": dict(Counter(ex["kind"] for ex in train)),
        "retrieval_grounded": sum(1 for ex in train if ex["context"]),
        "heldout": len(heldout),
        "heldout_kinds": dict(Counter(ex["kind"] for ex in heldout)),
        "rows_used": len({r for ex in train for r in ex.get("rows", ())}),
        "rows_heldout": int(held.sum()),
        "retrieval": retrieval_spec(),
        "paths": {"train": str(train_path), "heldout": str(heldout_path)},
    }
