"""Training metrics: every row goes to RUN/metrics.jsonl and, with `report_to`, through accelerate's tracker of
that name: TensorBoard event files under RUN/tensorboard/, or a wandb, MLflow or trackio run named after the run
directory. Each tracker is an optional extra (pip install 'collegeadvisor[tensorboard]')."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from collegeadvisor.fsutil import append_jsonl

TRACKERS = {  # report_to -> modules that provide it (any one)
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "trackio": ("trackio",),
}
PROJECT = "collegeadvisor"


def missing_tracker(report_to: str | None) -> str | None:
    """The package report_to needs when none that provides it is installed; None when it is (or nothing is sent)."""
    if not report_to:
        return None
    for module in TRACKERS[report_to]:
        try:
            if find_spec(module) is not None:
                return None
        except (ImportError, ValueError):
            continue
    return TRACKERS[report_to][0]


def open_tracker(report_to: str, run_dir: Path, config: dict | None = None):
    """accelerate's tracker for report_to, started, with the run's settings as its configuration."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS  # accelerate (heavy): only when a tracker opens

    kwargs = {
        "tensorboard": dict(run_name="tensorboard", logging_dir=str(run_dir)),
        "wandb": dict(run_name=PROJECT, name=run_dir.name, dir=str(run_dir)),
        "mlflow": dict(experiment_name=PROJECT, run_name=run_dir.name),
        "trackio": dict(run_name=PROJECT, name=run_dir.name),
    }[report_to]
    tracker = LOGGER_TYPE_TO_CLASS[report_to](**kwargs)
    tracker.start()
    if config:
        tracker.store_init_configuration({k: v for k, v in config.items() if v is not None})
    return tracker


class Metrics:
    """metrics.jsonl, and the same rows through the report_to tracker (on the main process only)."""

    def __init__(self, run_dir: Path, report_to: str | None = None, main: bool = True, config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.main = main
        self.trackers = [open_tracker(report_to, Path(run_dir), config)] if report_to and main else []

    def log(self, row: dict) -> None:
        if not self.main:
            return
        append_jsonl(self.path, [row])  # a failed write names the file and the cause
        values = {k: v for k, v in row.items() if k != "step"}
        for tracker in self.trackers:
            tracker.log(values, step=row["step"])

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
