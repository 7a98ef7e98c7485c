"""Run checks: a run directory against the config (base model, chat template and data it was trained on, the
settings that differ; runs.run_mismatches, as loading a run compares them), whether it completed, and a run name
that is taken already."""

from __future__ import annotations

from pathlib import Path

from collegeadvisor.check.findings import Finding, finding
from collegeadvisor.errors import ManifestError
from collegeadvisor.fsutil import file_sha256
from collegeadvisor.runs import read_manifest, run_mismatches


def check_run(cfg, run: str | Path, tokenizer, resolved: str) -> list[Finding]:
    run = Path(run)
    try:
        m = read_manifest(run)
    except ManifestError as exc:
        where, _, msg = str(exc).partition(": ")
        return [finding("error", "runs", where, msg, "pass a run directory written by `collegeadvisor train`",
                        "no-manifest")]
    return (match_findings(cfg, run, m, tokenizer, resolved) + status_findings(run, m)
            + changes_findings(cfg, run, m))


def match_findings(cfg, run: Path, m: dict, tokenizer, resolved: str) -> list[Finding]:
    """The run's base model, its files and its chat template against the config's."""
    where, out = f"{run}/manifest.json", []
    for bad in run_mismatches(m, cfg.base_model, resolved, tokenizer.chat_template or ""):
        if bad.what == "base_model":
            out.append(finding("error", "runs", where, f"the run was trained on base model {bad.trained!r}, the "
                               f"config names {bad.now!r}: its adapter fits only its own base",
                               f"set base_model: {bad.trained}, or pick a run of {bad.now}", "run-base-model"))
        elif bad.what == "weights":
            out.append(finding("error", "runs", where, f"base model {cfg.base_model} now has {bad.key} "
                               f"{bad.now[:12]}, the run was trained on {bad.trained[:12]}",
                               "restore the base model the run was trained on", "run-base-model"))
        else:
            out.append(finding("error", "runs", where, "the run was trained with another chat template (sha256 "
                               f"{bad.trained[:12]}) than this model's ({bad.now[:12]})", "use the run's base model; "
                               "eval/chat/serve render with the manifest's template", "run-template"))
    return out


def status_findings(run: Path, m: dict) -> list[Finding]:
    status = m.get("status")
    if status == "complete":
        if not (run / "adapter").is_dir():
            return [finding("error", "runs", run, "manifest says complete but adapter/ is missing",
                            "train again; the adapter was deleted", "run-incomplete")]
        return [finding("info", "runs", run, f"complete run: {json_metrics(m.get('metrics') or {})}", code="run")]
    if status == "paused":
        return [finding("warning", "runs", run, f"the run is paused at step {_step(run)}: it did not complete",
                        f"continue it with `collegeadvisor train --resume {run}`", "run-incomplete")]
    if status == "running":
        return [finding("warning", "runs", run, "the run did not complete (status running: still training, or "
                        "killed)", f"if it is not running any more, resume it with `collegeadvisor train --resume "
                        f"{run}`", "run-incomplete")]
    err = f": {m['error']}" if m.get("error") else ""
    return [finding("error", "runs", run, f"the run did not complete (status {status}{err})",
                    f"fix the cause, then `collegeadvisor train --resume {run}` or start a new run", "run-incomplete")]


def changes_findings(cfg, run: Path, m: dict) -> list[Finding]:
    """Data and settings that differ from what the run was trained with."""
    out = []
    data = m.get("data") or {}
    if cfg.data and Path(cfg.data).is_file() and data.get("sha256") and data["sha256"] != file_sha256(cfg.data):
        out.append(finding("warning", "runs", cfg.data, f"differs from the data run {run.name} was trained on "
                           "(sha256 differs): --resume would refuse it", "start a new run for new data", "run-data"))
    old = m.get("config") or {}
    changed = [k for k, v in cfg.model_dump().items()
               if k in old and old[k] != v and k not in ("output_dir", "run_name", "stop_after_steps")]
    if changed:
        out.append(finding("info", "runs", run, "settings that differ from the run: " + ", ".join(
            f"{k} {old[k]!r} -> {getattr(cfg, k)!r}" for k in changed), code="run-settings"))
    return out


def json_metrics(metrics: dict) -> str:
    keys = ("steps", "final_loss", "val_loss")
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float))) or "no metrics"


def _step(run: Path) -> str:
    from collegeadvisor.train.checkpoint import checkpoints  # the train package imports torch: only here

    found = checkpoints(run)
    return found[-1].name.split("-")[1].lstrip("0") or "0" if found else "?"


def check_output_dir(cfg) -> list[Finding]:
    if cfg.run_name and (Path(cfg.output_dir) / cfg.run_name / "manifest.json").exists():
        run = Path(cfg.output_dir) / cfg.run_name
        return [finding("error", "runs", "run_name", f"{run} already holds a run; train would refuse it",
                        f"pick another run_name, or continue it with `collegeadvisor train --resume {run}`",
                        "run-exists")]
    return []


