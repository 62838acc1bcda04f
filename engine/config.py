"""Typed run configuration: one dataclass per room, built from a YAML recipe plus overrides.

    cfg = load_config("hybrid", ["optim.lr=2e-4", "model.path=/ckpt/Qwen2.5-Omni-7B"])

`--recipe NAME` reads `recipes/NAME.yaml` (or a path to a YAML file). Each trailing
`key=value` overrides one dotted key; the value is parsed as YAML (`2e-4`, `true`, `[asr, sum]`)
and checked against the field's type. Every mistake gets an error that names the key, the
value and what to do: unknown keys list the nearest valid ones, a missing recipe lists the
recipes that exist.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from loaders.config import DataConfig
from loaders.curriculum import ScheduleConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"

# LoRA targets: the LLM's attention and MLP projections. The audio encoder also has
# q_proj/k_proj/v_proj, so targets are matched only under the LLM's decoder layers.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A recipe or override the engine cannot use; the message says what to change."""


class ModelPathError(ConfigError):
    """model.path does not hold a usable Qwen2.5-Omni checkpoint (folder, files, weights, tokenizer)."""


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | 7b (random init, real shapes) ; ignored when path is set
    path: str = ""  # local Hugging Face Qwen2.5-Omni checkpoint folder
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    train_audio_encoder: bool = False
    attn_backend: str = "auto"  # auto | flash_attn | torch_varlen | sdpa_varlen | sdpa | eager (engine/attention.py)
    liger: bool | str = "auto"  # auto (on CUDA) | true | false: Liger's RMSNorm, SwiGLU, M-RoPE on the LLM
    gradient_checkpointing: bool = False
    compile: bool = False
    # The last LLM layer's o_proj and MLP run on the rows the loss reads only (engine/target_rows.py).
    last_layer_on_targets: bool = True
    fsdp: bool | str = "auto"  # auto (with >1 process or on CUDA) | true | false: FSDP2 wrapping (engine/parallel.py)
    seed: int = 0  # seed of the random init of the presets


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    impl: str = "auto"  # auto | triton | triton_gemm | reference | torch (kernels/lora.py IMPLS)
    # auto (= on) | true | false: q/k/v and gate/up/down of a layer as one grouped kernel call each
    # (engine/lora.py); layers whose targets are partial keep per-projection LoRA.
    grouped: bool | str = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    grad_accum: int = 1
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops


@dataclass
class LossConfig:
    impl: str = "auto"  # auto | triton | reference | naive
    z_loss: float = 0.0
    label_smoothing: float = 0.0


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = only at the end
    keep: int = 2
    resume: str = "auto"  # auto | never | PATH of a step folder


@dataclass
class MetricsConfig:
    log_every: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: float = 0.0  # override of the device's peak bf16 dense TFLOP/s; 0 = from the device table


@dataclass
class ProfilerConfig:
    enabled: bool = False
    wait: int = 1
    warmup: int = 1
    active: int = 2


@dataclass
class EvalConfig:
    every: int = 0  # steps between validations; 0 = at stage boundaries and at the end only
    max_samples: int = 32  # generation pass bound (per run, split across ranks)
    max_new_tokens: int = 48
    at_end: bool = True


@dataclass
class DebugConfig:
    """Fault injection for tests of the engine's safety nets. Leave empty in real runs."""

    nonfinite_loss_at: list[int] = field(default_factory=list)  # steps whose loss is made NaN
    stop_after_steps: int = 0  # end the run after this step, checkpoint first, as a preempted job would
    # Raise an error on this rank after step fail_at_step (-1 = never), as a disk or data error
    # would: how a multi-process job ends when one rank fails while the others wait in a collective.
    fail_on_rank: int = -1
    fail_at_step: int = 1
    # This rank sends itself SIGTERM as the validation at step sigterm_in_eval_at_step begins
    # (-1 = never): a preemption that lands in the middle of an evaluation.
    sigterm_on_rank: int = -1
    sigterm_in_eval_at_step: int = 1


@dataclass
class RunConfig:
    recipe: str = "custom"
    output_dir: str = ""  # default: runs/<recipe>-<UTC timestamp>
    max_steps: int = 100  # 0 = bounded by max_tokens only
    max_tokens: int = 0  # 0 = bounded by max_steps only; the first bound reached ends the run
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# --- recipes and overrides -------------------------------------------------------------


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError(
        f"recipe '{name_or_path}' not found (looked for {p if p.suffix else candidate}). "
        f"Recipes that exist: {', '.join(available_recipes())}; or pass a path to a YAML file."
    )


def load_config(recipe: str | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Recipe YAML + `key=value` overrides -> a checked RunConfig."""
    raw: dict = {}
    name = "custom"
    if recipe:
        path = recipe_path(recipe)
        name = path.stem
        raw = read_recipe_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping of settings, got {type(raw).__name__}")
        raw.setdefault("recipe", name)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = build_dataclass(RunConfig, raw, prefix="")
    for name in ("max_steps", "max_tokens"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} is negative: give a count, or 0 for no bound of that kind "
                              "(max_steps=0 with max_tokens set ends the run by tokens alone)")
    if cfg.max_steps <= 0 and cfg.max_tokens <= 0:
        raise ConfigError("the run has no end: set max_steps (e.g. max_steps=1000) or max_tokens (e.g. max_tokens=5e6), "
                          "or both (the first reached ends the run)")
    validate_config(cfg)
    if not cfg.output_dir:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        cfg.output_dir = str(Path("runs") / f"{cfg.recipe}-{stamp}")
    return cfg


def read_recipe_yaml(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"recipe {path} is not valid YAML{where}: {what}; fix the file "
                          "(or start from one of recipes/*.yaml)") from None


def check_repeated_keys(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Command-line overrides that name a setting twice: the last one wins (scripts append to a
    base command line), said in a returned note, except for shard lists. A repeated shard list is
    an unquoted brace range (`data.train=/d/train-{000000..000004}.tar`) that the shell expanded
    into one argument per shard, of which the last alone would be kept: an error."""
    values: dict[str, list[str]] = {}
    for item in overrides:
        key, _, text = item.partition("=")
        values.setdefault(key.strip(), []).append(text)
    notes = []
    for key, given in values.items():
        if len(given) < 2:
            continue
        shown = ", ".join(given[:3]) + (", ..." if len(given) > 3 else "")
        if key in ("data.train", "data.val") or any(".tar" in text for text in given):
            raise ConfigError(f"{key} is given {len(given)} times ({shown}); a shard list is one argument. If the "
                              f"shell expanded a brace range, quote it: '{key}=/path/{key.rpartition('.')[2]}-{{000000..000511}}.tar'")
        notes.append(f"{key} is given {len(given)} times ({shown}): the last, {given[-1]}, is used")
    return notes


def parse_override(item: str) -> tuple[str, object]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=2e-4)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text if not text.strip().startswith("[") else _list_yaml_cannot_parse(key, text.strip())
    return key, value


def _list_yaml_cannot_parse(key: str, text: str) -> list:
    """A list YAML refused, most often shard URLs with brace ranges ([[a-{0..7}.tar], [b-{0..3}.tar]]):
    read as a list of URL lists when that is unambiguous, else an error. (A value starting with
    "{" that YAML refuses stays a string: it is a brace URL, as in {/d/a,/d/b}/train-0.tar.)"""
    from loaders.shards import parse_url_lists

    try:
        return parse_url_lists(text)
    except ValueError as e:
        example = "[['/d/a/train-{000000..000007}.tar'], ['/d/b/train-{000000..000003}.tar']]"
        raise ConfigError(f"override {key}={text} is not a list that can be read ({e}); quote each URL, "
                          f"e.g. two sources: \"{key}={example}\"") from None


def _set_dotted(raw: dict, key: str, value: object) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: '{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def all_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def build_dataclass(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            dotted = f"{prefix}{key}"
            near = difflib.get_close_matches(dotted, all_keys(), n=3, cutoff=0.5)
            near += [k for k in all_keys() if k.endswith("." + key) and k not in near]
            hint = f" Did you mean: {', '.join(near[:4])}?" if near else ""
            raise ConfigError(f"unknown config key '{dotted}'.{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint = hints[f.name]
        value = raw[f.name]
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section; give its fields (e.g. {dotted}.<field>=...)")
            kwargs[f.name] = build_dataclass(hint, value, dotted + ".")
        else:
            kwargs[f.name] = check_type(dotted, value, hint)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise ConfigError(f"section '{prefix.rstrip('.') or 'top level'}': {e}") from e


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_type(key: str, value, hint):
    """Return value converted to `hint` where that is lossless (int -> float), else raise."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': value {value!r} is not of type {_type_name(hint)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': value {value!r} should be a list ({_type_name(hint)}), e.g. {key}=[a,b]")
        (item,) = args or (typing.Any,)
        return [check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': value {value!r} should be a mapping ({_type_name(hint)})")
        return value
    if hint is typing.Any:
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (float, str)) and not isinstance(value, bool):  # 5e6, 1.0e3
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(
        f"config key '{key}': value {value!r} ({type(value).__name__}) is not of the expected type {_type_name(hint)}"
    )


# --- value checks: ranges and choices, before anything is built ---------------------------

MODEL_PRESETS = ("tiny", "7b")  # engine/model.py's TINY_SHAPES and SEVEN_B_SHAPES
MODEL_DTYPES = ("auto", "bf16", "fp16", "fp32")  # engine/model.py resolve_dtype
SWITCH_CHOICES = ("auto", "true", "false")  # model.liger, model.fsdp, lora.grouped
RESUME_CHOICES = ("auto", "never")  # or the path of a step folder


def _choice(key: str, value, allowed) -> None:
    if str(value).lower() not in allowed:
        raise ConfigError(f"config key '{key}': {value!r} is not allowed; use one of {', '.join(allowed)}")


def _at_least(key: str, value, low) -> None:
    if value < low:
        raise ConfigError(f"config key '{key}': {value!r} is too small; it must be >= {low}")


def _in_range(key: str, value, low, high, *, high_open: bool = False) -> None:
    if not (low <= value < high if high_open else low <= value <= high):
        raise ConfigError(f"config key '{key}': {value!r} is out of range; it must be in "
                          f"[{low}, {high}{')' if high_open else ']'}")


def validate_config(cfg: RunConfig) -> None:
    """Ranges and choices of every setting whose bad value would otherwise surface later as a
    traceback (a negative tensor size, a division by zero, an unknown kernel name)."""
    from engine.attention import BACKENDS  # the kernel modules own their choice lists
    from kernels.linear_cross_entropy import IMPLS as LOSS_IMPLS
    from kernels.lora import IMPLS as LORA_IMPLS

    _at_least("max_steps", cfg.max_steps, 0)
    _at_least("max_tokens", cfg.max_tokens, 0)
    m = cfg.model
    if not m.path:
        _choice("model.preset", m.preset, MODEL_PRESETS)
    _choice("model.dtype", m.dtype, MODEL_DTYPES)
    _choice("model.attn_backend", m.attn_backend, ("auto",) + tuple(BACKENDS))
    _choice("model.liger", m.liger, SWITCH_CHOICES)
    _choice("model.fsdp", m.fsdp, SWITCH_CHOICES)
    lo = cfg.lora
    _at_least("lora.rank", lo.rank, 1)
    if lo.alpha <= 0:
        raise ConfigError(f"config key 'lora.alpha': {lo.alpha!r} must be > 0 (the LoRA scale is alpha / rank)")
    _in_range("lora.dropout", lo.dropout, 0.0, 1.0, high_open=True)
    unknown = [t for t in lo.targets if t not in DEFAULT_LORA_TARGETS]
    if not lo.targets or unknown or len(set(lo.targets)) != len(lo.targets):
        what = f"unknown target(s) {unknown}" if unknown else ("an empty list" if not lo.targets else "a repeated target")
        raise ConfigError(f"config key 'lora.targets': {lo.targets!r} has {what}; use some of "
                          f"{', '.join(DEFAULT_LORA_TARGETS)} (the LLM's attention and MLP projections)")
    _choice("lora.impl", lo.impl, LORA_IMPLS)
    _choice("lora.grouped", lo.grouped, SWITCH_CHOICES)
    o = cfg.optim
    if o.lr <= 0:
        raise ConfigError(f"config key 'optim.lr': {o.lr!r} must be > 0")
    _at_least("optim.weight_decay", o.weight_decay, 0.0)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"config key 'optim.betas': {o.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    _in_range("optim.min_lr_ratio", o.min_lr_ratio, 0.0, 1.0)
    _at_least("optim.grad_clip", o.grad_clip, 0.0)
    _at_least("optim.grad_accum", o.grad_accum, 1)
    _at_least("optim.max_bad_steps", o.max_bad_steps, 1)
    _choice("loss.impl", cfg.loss.impl, LOSS_IMPLS)
    _at_least("loss.z_loss", cfg.loss.z_loss, 0.0)
    _in_range("loss.label_smoothing", cfg.loss.label_smoothing, 0.0, 1.0, high_open=True)
    _at_least("checkpoint.every", cfg.checkpoint.every, 0)
    _at_least("checkpoint.keep", cfg.checkpoint.keep, 0)
    if cfg.checkpoint.resume in ("", None):
        raise ConfigError(f"config key 'checkpoint.resume' is empty; use {', '.join(RESUME_CHOICES)} or a step folder path")
    _at_least("metrics.log_every", cfg.metrics.log_every, 1)
    _at_least("metrics.peak_tflops", cfg.metrics.peak_tflops, 0.0)
    _at_least("profiler.wait", cfg.profiler.wait, 0)
    _at_least("profiler.warmup", cfg.profiler.warmup, 0)
    _at_least("profiler.active", cfg.profiler.active, 1)
    _at_least("eval.every", cfg.eval.every, 0)
    _at_least("eval.max_samples", cfg.eval.max_samples, 0)
    _at_least("eval.max_new_tokens", cfg.eval.max_new_tokens, 1)
    _check_schedule(cfg)
    _check_data_sources(cfg)
    _check_output_dir(cfg.output_dir)


def _check_data_sources(cfg: RunConfig) -> None:
    """data.weights against the sources of data.train, data.demo_dir when the demo set is used."""
    from loaders.sources import data_sources_problem

    problem = data_sources_problem(cfg.data)
    if problem:
        raise ConfigError(problem)


def _check_output_dir(output_dir: str) -> None:
    """output_dir must be a folder or creatable as one: not an existing file, nor under one."""
    from loaders.output_folder import output_folder_problem

    problem = output_folder_problem(Path(output_dir)) if output_dir else None
    if problem:
        raise ConfigError(f"output_dir={output_dir}: {problem}; give a folder path (a new or an existing run folder)")


def _check_schedule(cfg: RunConfig) -> None:
    """Build the stage list once now, so a bad schedule is a config error, not a traceback later."""
    from loaders.curriculum import ScheduleError

    try:
        cfg.schedule.validate()
        cfg.schedule.build(cfg.max_steps or None, cfg.max_tokens or None)
    except ScheduleError as e:
        raise ConfigError(str(e)) from None


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, allow_unicode=True)
