"""One typed configuration for every stage: YAML file, then CLI overrides; defaults are the corrected recipe."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from collegeadvisor.errors import AdvisorError
from collegeadvisor.models import DEFAULT_BASE_MODEL


class Config(BaseModel):
    """Every setting of data preparation, training and generation. Field docs are the CLI help."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model and data
    base_model: str = Field(DEFAULT_BASE_MODEL, description="embedded:NAME, a local folder or .gguf, or a hub id")
    data: Optional[str] = Field(None, description="training data: JSON, JSONL or CSV (alpaca, sharegpt or messages)")
    val_data: Optional[str] = Field(None, description="validation data; default: a seeded split of --data")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of --data held out for validation loss")
    max_examples: Optional[int] = Field(None, ge=1, description="use at most this many training examples (seeded)")
    output_dir: str = Field("runs", description="folder that holds run directories")
    run_name: Optional[str] = Field(None, description="run directory name (default: timestamp)")
    # the corrected recipe
    max_length: int = Field(512, ge=16, description="max tokens per example (the seed's 256 cut answers)")
    truncation: Literal["drop", "error", "truncate"] = Field(
        "drop", description="examples whose answer would be cut: drop and count them, stop with an error, or cut"
    )
    epochs: float = Field(3, gt=0, description="passes over the training data")
    max_steps: Optional[int] = Field(None, ge=1, description="optimizer steps for the whole run (overrides epochs)")
    batch_size: int = Field(4, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(4, ge=1, description="micro-batches per optimizer step (effective batch = product)")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of steps with linear warmup")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, description="gradient clipping norm; null turns clipping off")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target: str = Field("all-linear", description="'all-linear' or comma-separated module names (q_proj,v_proj)")
    seed: int = 0
    # precision and speed
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    dtype: str = Field("auto", description="master weights: auto (fp32 on CPU/MPS, bf16 on CUDA), fp32, bf16, fp16")
    autocast_bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="bf16 autocast for matmuls where the hardware has bf16 (AVX512-BF16/AMX CPUs, CUDA)"
    )
    base_bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="keep the frozen base weights in bf16 (LoRA weights train in fp32); auto: wherever bf16 "
        "autocast is on"
    )
    group_by_length: bool = Field(True, description="batch examples of similar length (less padding)")
    batch_tokens: Optional[int] = Field(
        None, ge=16, description="most tokens (padding included) per forward pass: the batch_size x grad_accum "
        "examples of a step run as few, large passes of up to this size (same gradient); default batch_size x max_length"
    )
    packing: bool = Field(
        False, description="lay examples end to end in rows of max_length (no attention across examples) instead of "
        "padding each pass"
    )
    compile: bool = Field(False, description="torch.compile the model (pays on long GPU runs; slow to start on CPU)")
    num_threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch (default: torch's own choice)")
    # monitoring and checkpoints
    log_every: int = Field(5, ge=1, description="optimizer steps between metrics.jsonl lines")
    sample_every: int = Field(50, ge=0, description="optimizer steps between sample generations (0: off)")
    sample_count: int = Field(3, ge=0, description="validation questions answered at each sample")
    sample_max_new_tokens: int = Field(96, ge=1)
    save_every: int = Field(100, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    eval_batch_size: int = Field(8, ge=1)
    collapse_loss: float = Field(1e-4, ge=0, description="loss below this with a zero/NaN grad norm is an error")
    stop_after_steps: Optional[int] = Field(
        None, ge=1, description="stop this invocation after N steps with a checkpoint; continue with --resume"
    )
    report_to: Optional[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        None, description="also send the metrics of metrics.jsonl to this tracker, through accelerate (an optional "
        "extra each: pip install 'collegeadvisor[tensorboard]')"
    )
    max_new_tokens: int = Field(256, ge=1, description="generation budget for eval, chat and serve")

    # ------------------------------------------------------------------------------------ command line
    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        """--config FILE, then one option per field (data over flags): --max-length 512, --no-group-by-length..."""
        p.add_argument("--config", help="YAML file of settings; options below override it")
        group = p.add_argument_group("settings (override the YAML file)")
        for name, field in cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            help_ = (field.description or "") + f" [default: {field.default}]"
            if field.annotation is bool:
                group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
            else:
                group.add_argument(flag, dest=name, default=None, choices=_choices(field.annotation),
                                   metavar=name.upper(), help=help_)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        """The --config file, then every option given on the command line; 'none' (or 'null') unsets a setting that
        may be unset (--max-steps none). A bad value is one line naming the option."""
        given = {}
        for name, field in cls.model_fields.items():
            value = getattr(args, name, None)
            if value is None:
                continue
            if isinstance(value, str) and value.lower() in NONE:
                if not _nullable(field.annotation):
                    raise AdvisorError(f"--{name.replace('_', '-')} {value}: this setting cannot be unset "
                                       f"[default: {field.default}]")
                value = None
            given[name] = value
        return _build(getattr(args, "config", None), given, from_flags=True)


NONE = ("none", "null")


def _nullable(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _choices(annotation) -> tuple | None:
    """The values a Literal setting takes (plus 'none' when it may be unset), for argparse."""
    inner = [a for a in typing.get_args(annotation) if a is not type(None)] if _nullable(annotation) else [annotation]
    if len(inner) != 1 or typing.get_origin(inner[0]) is not Literal:
        return None
    return typing.get_args(inner[0]) + (NONE[:1] if _nullable(annotation) else ())


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """YAML file (if any), then overrides (None values ignored); one clear line on a bad key or value."""
    return _build(path, {k: v for k, v in (overrides or {}).items() if v is not None})


def _build(path: str | Path | None, overrides: dict[str, Any], from_flags: bool = False) -> Config:
    data, where = _read_yaml(path)
    data.update(overrides)
    try:
        return Config(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "?"
        msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        if from_flags and key in overrides:
            raise AdvisorError(f"--{key.replace('_', '-')} {overrides[key]}: {msg}") from exc
        raise AdvisorError(f"{where}: setting '{key}': {msg}") from exc


def _read_yaml(path: str | Path | None) -> tuple[dict[str, Any], str]:
    """(settings, where they came from) of a YAML file; ({}, "defaults") without one."""
    if not path:
        return {}, "defaults"
    p = Path(path)
    if not p.is_file():
        raise AdvisorError(f"--config: {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise AdvisorError(f"{p}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from exc
    if not isinstance(loaded, dict):
        raise AdvisorError(f"{p}: expected a mapping of settings, got {type(loaded).__name__}")
    return dict(loaded), str(p)
