"""One typed configuration for every stage: YAML file, then CLI overrides. Training reads the top-level keys (defaults
are the corrected recipe); eval, chat, serve, kb and export each read their own section (`eval:` ...)."""

from __future__ import annotations

import argparse
import datetime
import math
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from collegeadvisor.errors import AdvisorError
from collegeadvisor.models import DEFAULT_BASE_MODEL

# The choices and defaults the sections below validate against; export and serve read them from here.
GGUF_TYPES = ("f32", "f16", "q8_0")  # export: GGUF weight types
TARGETS = ("merged", "gguf", "ollama")  # export --to
API_KEY_ENV = "COLLEGEADVISOR_API_KEY"  # serve: the environment variable holding the API key
# The most tokens generated per answer, for every command (eval, chat, serve) and generate's own default: answers
# run ~50-120 tokens and generation stops at end of turn, so the budget costs nothing on a good answer.
MAX_NEW_TOKENS = 256


class Config(BaseModel):
    """Every setting of data preparation, training and its sample generations. Field docs are the CLI help."""

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
    lora_dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on LoRA inputs (peft's and LLaMA-Factory's default is 0 too; 0.05 costs "
        "13% of CPU tokens/s in bench/train_throughput.py)"
    )
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
    pad_to_multiple_of: Optional[int] = Field(
        None, ge=1, description="pad each unpacked pass to a multiple of this many tokens (a few pass shapes instead "
        "of one per length: fewer sizes for the allocator to keep; costs the padding's compute)"
    )
    fused: bool = Field(
        True, description="fused LoRA and output-layer kernels: the same loss and gradients as peft's and "
        "transformers' own path, in less time and memory (off: their path)"
    )
    recompute_mlp: float = Field(
        0.5, ge=0.0, le=1.0, description="share of the layers whose MLP gate and up projections are recomputed in "
        "backward instead of kept (with fused; layers spread evenly): 1 keeps half of the memory a step keeps for "
        "backward (0.47 GB less at the peak of configs/advisor.yaml) for two more matmuls a layer, 1-2% of a step "
        "with AMX but 22% without (AMD EPYC); 0 keeps them all; 0.5, every other layer, halves both"
    )
    fused_attention: bool = Field(
        True, description="(with fused) causal attention's backward as a few large bf16 matmuls instead of the CPU "
        "flash kernel's own: the same gradients to bf16 precision, a backward 1.2-2x faster at 200-512 tokens; masked, "
        "packed and GPU passes keep transformers' SDPA"
    )
    fused_elementwise: bool = Field(
        True, description="(with fused) RMSNorm, the MLP's activation and the loss's softmax as kernels torch.compile "
        "generates on CPU (each compiles once, seconds, cached on disk; eager where no C++ compiler is found): "
        "the same values to the last bit or two, about 9% more tokens/s on SmolLM2 (off with compile, which takes the "
        "whole model)"
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
    max_time: Optional[Union[str, dict[str, Union[int, float]]]] = Field(
        None, description="time budget of training, counted from its first step (model loading not counted): "
        "'DD:HH:MM:SS' or 'HH:MM:SS' (quote it in YAML), or in YAML a mapping {hours: 1, minutes: 30} of days, hours, "
        "minutes, seconds. The steps are planned (warmup, decay) to fit it at the speed measured at the start, the "
        "fewer of these and max_steps (or epochs), and planned again at warmup's end at the pace of the steps so far; "
        "training stops at the first step past it, with a checkpoint. With "
        "--resume: this invocation's budget (the planned steps stay)"
    )
    report_to: Optional[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        None, description="also send the metrics of metrics.jsonl to this tracker, through accelerate (an optional "
        "extra each: pip install 'collegeadvisor[tensorboard]')"
    )

    @field_validator("max_time", mode="before")
    @classmethod
    def _check_max_time(cls, value: Any) -> Any:
        if isinstance(value, datetime.timedelta):  # the Python API may pass what Lightning's Trainer takes
            value = {"seconds": value.total_seconds()}
        try:
            max_time_seconds(value)
        except ValueError as exc:
            raise PydanticCustomError("max_time", "{why}", {"why": str(exc)}) from None
        return value.strip() if isinstance(value, str) else value

    @property
    def max_time_s(self) -> float | None:
        """max_time in seconds (None: no time budget)."""
        return max_time_seconds(self.max_time)

    @classmethod
    def from_manifest(cls, saved: dict[str, Any]) -> "Config":
        """The config a run was trained with, as its manifest recorded it (settings retired since then dropped)."""
        return cls(**{k: v for k, v in saved.items() if k not in RETIRED})

    # ------------------------------------------------------------------------------------ command line
    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
        """--config FILE, then one option per field (or per field named in `only`), data over flags: --max-length
        512, --no-group-by-length..."""
        p.add_argument("--config", help="YAML file of settings; options below override it")
        add_model_arguments(p, cls, only)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        """The --config file, then every option given on the command line; 'none' (or 'null') unsets a setting that
        may be unset (--max-steps none). A bad value is one line naming the option."""
        return _build(cls, getattr(args, "config", None), flags_given(cls, args), from_flags=True)


# ------------------------------------------------------------------------------------------ max_time
DURATION_UNITS = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
DURATION_FORMS = "'DD:HH:MM:SS' or 'HH:MM:SS', or a mapping of days, hours, minutes, seconds"


def max_time_seconds(value: Any) -> float | None:
    """Seconds of a max_time setting (None: none). Accepted: 'DD:HH:MM:SS' (Lightning's Trainer form) or 'HH:MM:SS',
    each field a whole number >= 0 (not capped: '00:90:00' is 90 minutes); a mapping of days, hours, minutes and
    seconds (numbers >= 0). Refused, with a ValueError of one line: 'MM:SS' (is 10:00 ten hours or ten minutes?),
    plain numbers (YAML reads an unquoted 1:30:00 as the number 5400) and a total of 0."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_FORMS}, got {value!r}")
    if isinstance(value, (int, float)):
        raise ValueError(f"got the number {value!r}; write a quoted 'HH:MM:SS' or a mapping such as {{minutes: 10}} "
                         "(YAML reads an unquoted 1:30:00 as a number of seconds in base 60)")
    if isinstance(value, str):
        parts = value.strip().split(":")
        if len(parts) == 2:
            raise ValueError(f"{value!r} is ambiguous (hours:minutes or minutes:seconds?); write 'HH:MM:SS' or "
                             "'DD:HH:MM:SS'")
        if len(parts) not in (3, 4) or not all(p.isascii() and p.isdigit() for p in parts):
            raise ValueError(f"{value!r} is not a duration; expected {DURATION_FORMS}")
        fields = [0] * (4 - len(parts)) + [int(p) for p in parts]
        seconds = float(sum(n * unit for n, unit in zip(fields, DURATION_UNITS.values())))
    elif isinstance(value, dict):
        seconds = 0.0
        for key, n in value.items():
            if key not in DURATION_UNITS:
                raise ValueError(f"unknown key {key!r}; expected {', '.join(DURATION_UNITS)}")
            if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
                raise ValueError(f"{key}: expected a number >= 0, got {n!r}")
            seconds += n * DURATION_UNITS[key]
    else:
        raise ValueError(f"expected {DURATION_FORMS}, got {type(value).__name__}")
    if seconds <= 0:
        raise ValueError(f"{value!r} is no time at all; give more than 0 seconds")
    return seconds


def duration_text(seconds: float) -> str:
    """Seconds as DD:HH:MM:SS (with a fraction of a second where there is one)."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    frac = f"{seconds - whole:.3f}".lstrip("0") if seconds - whole >= 0.0005 else ""
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}{frac}"


# A top-level key that no longer exists, and where its setting went.
RETIRED = {"max_new_tokens": "moved: set max_new_tokens in the eval, chat or serve section"}
NONE = ("none", "null")


# ------------------------------------------------------------------------------------------ the other commands
class Section(BaseModel):
    """The settings of one command other than train: the YAML file's `<section>:` mapping, then its flags."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    section: ClassVar[str] = ""

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
        """--config FILE and one option per field (or per field named in `only`)."""
        p.add_argument("--config", help=f"YAML file whose '{cls.section}:' section holds these settings; options "
                                        "below override it")
        add_model_arguments(p, cls, only)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Section":
        """Flags given, then the --config file's section, then defaults; a bad key or value is one line."""
        return _build(cls, getattr(args, "config", None), flags_given(cls, args), from_flags=True)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "Section":
        return _build(cls, path, {k: v for k, v in (overrides or {}).items() if v is not None})


class RunSettings(Section):
    run: str = Field("latest", description="run directory, or 'latest' (newest complete run)")
    output_dir: str = Field("runs", description="where 'latest' looks for runs")


class GenerationSettings(RunSettings):
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    engine: Literal["torch", "llamacpp", "openai"] = Field(
        "torch", description="what generates: torch (base + adapter), llamacpp (the run's GGUF export through "
                             "llama.cpp: pip install 'collegeadvisor[llamacpp]'), both under the constraint and the "
                             "check; or openai (an OpenAI-compatible server at --engine-url: the rows' grammar and the "
                             "check)")
    engine_url: Optional[str] = Field(None, description="--engine openai: the server (http://host:port)")
    engine_model: Optional[str] = Field(None, description="--engine openai: the model it serves (default: its first)")
    engine_grammar: Literal["llamacpp", "vllm", "none"] = Field(
        "llamacpp", description="--engine openai: how the server takes the rows' grammar (llama.cpp's 'grammar', "
                                "vLLM's structured outputs, or none: the check alone)")
    gguf: Optional[str] = Field(None, description="--engine llamacpp: the GGUF file (default: RUN/export/gguf/"
                                                  "model-q8_0.gguf, as `export --to gguf` writes it)")
    threads: Optional[int] = Field(None, ge=1, description="--engine llamacpp: CPU threads (default: all cores)")
    max_new_tokens: int = Field(MAX_NEW_TOKENS, ge=1, description="most tokens generated per answer")
    rag: Optional[bool] = Field(None, description="answer from rows retrieved from the knowledge base (default: when "
                                                  "the run was trained on retrieved rows)")
    k: Optional[int] = Field(None, ge=1, description="rows retrieved per question (default: the run's, as in "
                                                     "training)")
    kb_path: Optional[str] = Field(None, description="Chroma folder (default: kb_store)")
    kb_url: Optional[str] = Field(None, description="Chroma server URL, instead of a local folder")


class EvalConfig(GenerationSettings):
    section: ClassVar[str] = "eval"
    questions: Optional[str] = Field(None, description="held-out JSONL (default: heldout.jsonl beside the run's data)")
    out: Optional[str] = Field(None, description="report folder (default: RUN/eval)")
    compare: bool = Field(False, description="also run the base model without the adapter")
    batch_size: int = Field(16, ge=1, description="questions generated together")
    limit: Optional[int] = Field(None, ge=1, description="only the first N questions")
    base_max_new_tokens: Optional[int] = Field(None, ge=1, description="generation budget of the base model with "
                                                                       "--compare (default: max_new_tokens)")


class ChatConfig(GenerationSettings):
    section: ClassVar[str] = "chat"
    temperature: float = Field(0.0, ge=0, description="0: greedy")


class ServeConfig(GenerationSettings):
    section: ClassVar[str] = "serve"
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str = Field(API_KEY_ENV, description="environment variable holding the key clients must send as "
                                                      "'Authorization: Bearer KEY' (--api-key gives the key itself)")
    max_tokens_limit: int = Field(1024, ge=1, description="largest max_tokens a request may ask for")
    batch_size: int = Field(8, ge=1, description="non-streaming requests generated together")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    cors_origins: list[str] = Field(
        default_factory=list, json_schema_extra={"flag": "--cors-origin", "action": "append"},
        description="let web pages from this origin (https://example.org) call the API; repeatable")
    max_body_bytes: int = Field(1 << 20, ge=1, description="largest request body")
    max_connections: int = Field(256, ge=1, description="open connections before 503")
    request_timeout: float = Field(30.0, gt=0, description="seconds a client may take to send a request's headers, "
                                                           "and its body")


class KbConfig(Section):
    section: ClassVar[str] = "kb"
    path: Optional[str] = Field(None, description="Chroma folder (default: kb_store)")
    url: Optional[str] = Field(None, description="Chroma server URL (http://host:8000), instead of a folder")
    collection: str = "scorecard"
    k: int = Field(5, ge=1, description="passages a query shows, and recall counts")
    batch_size: int = Field(2048, ge=1, description="rows embedded per batch by build")
    limit: Optional[int] = Field(None, ge=1, description="build: only the first N rows of the table")


class ExportConfig(RunSettings):
    section: ClassVar[str] = "export"
    to: Optional[Literal[TARGETS]] = Field(None, description="what to write (required)")
    out: Optional[str] = Field(None, description="output folder (default: RUN/export/<to>)")
    gguf_type: Literal[GGUF_TYPES] = Field("q8_0", description="GGUF weight type")
    device: str = Field("cpu", description="where the merge runs")
    verify: int = Field(0, ge=0, json_schema_extra={"nargs": "?", "const": 8, "metavar": "N"},
                        description="load the export back and compare its template, prompt tokens and greedy text "
                                    "with the run on N held-out questions (--verify alone: 8)")


SECTIONS: dict[str, type[Section]] = {s.section: s for s in (EvalConfig, ChatConfig, ServeConfig, KbConfig,
                                                                ExportConfig)}


def as_yaml(settings: Section) -> str:
    """A command's resolved settings as a config file: passed back as --config, it repeats them."""
    name = settings.section
    return (f"# collegeadvisor {name}: the settings it ran with (flags, then the '{name}:' section of --config, then "
            f"defaults)\n" + yaml.safe_dump({name: settings.model_dump()}, sort_keys=False))


def as_line(settings: Section) -> str:
    """The same, on one line (for commands with no output folder to write it to)."""
    flow = yaml.safe_dump({settings.section: settings.model_dump()}, default_flow_style=True, width=1 << 20,
                          sort_keys=False)
    return "settings: " + flow.strip()


# ------------------------------------------------------------------------------------------ flags and YAML
def add_command(sub, name: str, help_: str, settings: type[Config] | type[Section], func,
                only: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The subcommand `name` of the CLI's subparsers: --config FILE and one option per field of `settings` (or per
    field named in `only`), run by `func(args)`; returned for the command's own arguments."""
    p = sub.add_parser(name, help=help_)
    settings.add_arguments(p, only)
    p.set_defaults(func=func)
    return p


def add_model_arguments(p: argparse.ArgumentParser, model: type[BaseModel], only: Sequence[str] | None = None) -> None:
    """One option per field of `model` (default None: the YAML file or the field's default decides); booleans get
    --x/--no-x, Literal fields their choices; a field's json_schema_extra holds its flag name or argparse shape."""
    group = p.add_argument_group("settings (override the YAML file)")
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        shape = dict(field.json_schema_extra or {})
        flag = shape.pop("flag", "--" + name.replace("_", "-"))
        help_ = field.description or ""
        if "(default:" not in help_:  # a description may say what the default means
            help_ += f" [default: {field.get_default(call_default_factory=True)}]"
        help_ = help_.replace("%", "%%")  # argparse reads % as a format: "13%" crashed every --help
        if bool in (field.annotation, *typing.get_args(field.annotation)):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
            continue
        shape.setdefault("metavar", name.upper())
        group.add_argument(flag, dest=name, default=None, choices=_choices(field.annotation), help=help_, **shape)


def flags_given(model: type[BaseModel], args: argparse.Namespace) -> dict[str, Any]:
    """The options of `model` given on the command line; 'none' (or 'null') unsets a setting that may be unset."""
    given = {}
    for name, field in model.model_fields.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if isinstance(value, str) and value.lower() in NONE:
            if not _nullable(field.annotation):
                raise AdvisorError(f"--{name.replace('_', '-')} {value}: this setting cannot be unset "
                                   f"[default: {field.default}]")
            value = None
        given[name] = value
    return given


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
    return _build(Config, path, {k: v for k, v in (overrides or {}).items() if v is not None})


def _build(model: type[BaseModel], path: str | Path | None, overrides: dict[str, Any], from_flags: bool = False):
    """`model` from its part of the YAML file, then the overrides. A bad key or value is one line naming the flag,
    or the file and the setting (`eval.k` for a section's)."""
    data, where = _read_yaml(path)
    section = getattr(model, "section", "")
    data = _part(data, where, section)
    data.update(overrides)
    try:
        return model(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "?"
        msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        if from_flags and key in overrides:
            raise AdvisorError(f"--{key.replace('_', '-')} {overrides[key]}: {msg}") from exc
        raise AdvisorError(f"{where}: setting '{section + '.' if section else ''}{key}': {msg}") from exc


def _part(data: dict[str, Any], where: str, section: str) -> dict[str, Any]:
    """Training's top-level settings (section ''), or one section's mapping; the file's other keys must be
    training settings or sections."""
    for key, why in RETIRED.items():
        if key in data:
            raise AdvisorError(f"{where}: setting '{key}': {why}")
    if not section:
        return {k: v for k, v in data.items() if k not in SECTIONS}
    if unknown := [k for k in data if k not in Config.model_fields and k not in SECTIONS]:
        raise AdvisorError(f"{where}: setting '{unknown[0]}': unknown setting")
    part = data.get(section)
    if part is None:
        return {}
    if not isinstance(part, dict):
        raise AdvisorError(f"{where}: setting '{section}': expected a mapping of settings, got {type(part).__name__}")
    return dict(part)


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
