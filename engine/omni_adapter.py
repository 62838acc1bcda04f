"""Convert a thinker adapter into one for the full Qwen2.5-Omni model (thinker + talker + token2wav).

    python -m engine.omni_adapter runs/hybrid-.../adapter runs/hybrid-.../adapter-omni

A training run exports its LoRA adapter for `Qwen2_5OmniThinkerForConditionalGeneration`
(engine/lora.py, save_peft_adapter): module names start at the thinker (`model.language_model...`).
Speech output needs the full `Qwen2_5OmniForConditionalGeneration`, where the same modules live
under `thinker.`. PEFT finds neither its target modules nor its tensors there, so the adapter is
rewritten: every tensor key gets the `thinker.` prefix, and so do the names in adapter_config.json
that PEFT matches against module names of the whole model:

- `target_modules`: a string is a regex PEFT applies with re.fullmatch to each module name
  (peft.tuners.tuners_utils.check_target_module_exists). The new one is `^thinker\\.(?:...)$`
  around the old one, so it can only match inside the thinker: the talker has q_proj/k_proj/...
  layers of its own, and an unanchored pattern would put LoRA layers there with no weights.
  A list (PEFT matches its names as suffixes, which would reach the talker too) becomes such a
  regex with the same meaning inside the thinker.
- `modules_to_save` (a trained audio tower): PEFT matches these as suffixes of module names; each
  becomes the module's full path (`thinker.model.audio_tower`), taken from the tensor keys.
- `exclude_modules` given as a regex (fullmatch, like target_modules) gets the same prefix.
Everything else in adapter_config.json is kept as it is.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from engine.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# Where the thinker lives in Qwen2_5OmniForConditionalGeneration (the talker and token2wav are
# its siblings: `talker.`, `token2wav.`).
THINKER_PREFIX = "thinker."
OMNI_TOP_LEVEL = ("thinker.", "talker.", "token2wav.")
# PEFT's prefix of every saved adapter key (peft.utils.save_and_load, get_peft_model_state_dict).
PEFT_KEY_PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# The weights file PEFT also reads, which this converter does not: a clear refusal beats a miss.
PICKLED_WEIGHTS = "adapter_model.bin"
# Exit code of a refused conversion (argparse's code for bad arguments too).
USER_ERROR_EXIT = 2


class OmniAdapterError(ValueError):
    """An adapter folder or output folder this converter refuses; the message says what to do."""


# --- reading the thinker adapter ---------------------------------------------------------------

def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json of a LoRA adapter folder, after checking the folder is one."""
    if not adapter_dir.is_dir():
        raise OmniAdapterError(f"{adapter_dir} is not a folder; pass the adapter folder of a run (<run>/adapter)")
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.is_file():
        raise OmniAdapterError(f"{adapter_dir} has no {ADAPTER_CONFIG}: not a PEFT adapter folder; pass the adapter "
                               "folder of a run (<run>/adapter)")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        hint = (f"it holds {PICKLED_WEIGHTS}; load and save it once with PEFT (safe_serialization=True) to get "
                f"{ADAPTER_WEIGHTS}" if (adapter_dir / PICKLED_WEIGHTS).is_file()
                else "the export is incomplete; export the adapter again")
        raise OmniAdapterError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}: {hint}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OmniAdapterError(f"{config_path} is not valid JSON ({error}); export the adapter again") from error
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise OmniAdapterError(f"{config_path}: peft_type is {found!r}, not 'LORA'; only LoRA adapters are converted")
    return config


def read_adapter_tensors(adapter_dir: Path):
    """(tensors, safetensors metadata) of adapter_model.safetensors."""
    from safetensors import SafetensorError, safe_open

    path = adapter_dir / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as weights:
            return {key: weights.get_tensor(key) for key in weights.keys()}, weights.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise OmniAdapterError(f"{path} cannot be read as safetensors ({error}); export the adapter again") from error


def module_names(tensor_keys, adapter_dir: Path) -> list[str]:
    """The keys without PEFT's `base_model.model.` prefix, refusing an adapter already converted."""
    path = adapter_dir / ADAPTER_WEIGHTS
    if not tensor_keys:
        raise OmniAdapterError(f"{path} holds no tensors; export the adapter again")
    names = []
    for key in tensor_keys:
        if not key.startswith(PEFT_KEY_PREFIX):
            raise OmniAdapterError(f"{path}: tensor {key} does not start with {PEFT_KEY_PREFIX!r}: not a PEFT adapter "
                                   "saved for a whole model; pass the adapter folder of a run (<run>/adapter)")
        names.append(key[len(PEFT_KEY_PREFIX):])
    converted = [name for name in names if name.startswith(OMNI_TOP_LEVEL)]
    if converted:
        raise OmniAdapterError(f"{adapter_dir} is already an adapter for the full Omni model (tensor "
                               f"{PEFT_KEY_PREFIX}{converted[0]}); load it onto Qwen2_5OmniForConditionalGeneration "
                               "as it is")
    return names


# --- rewriting names ---------------------------------------------------------------------------

def strip_anchors(pattern: str) -> str:
    """The pattern without one leading `^` and one trailing unescaped `$` (re.fullmatch anchors anyway)."""
    if pattern.startswith("^"):
        pattern = pattern[1:]
    trailing_backslashes = len(pattern[:-1]) - len(pattern[:-1].rstrip("\\"))
    if pattern.endswith("$") and trailing_backslashes % 2 == 0:
        pattern = pattern[:-1]
    return pattern


def thinker_regex(pattern: str) -> str:
    """A fullmatch regex that matches `thinker.<name>` exactly where `pattern` matched `<name>`."""
    return rf"^{re.escape(THINKER_PREFIX)}(?:{strip_anchors(pattern)})$"


def suffix_list_as_regex(names: list[str]) -> str:
    """PEFT's list form (a module matches a name it equals or ends with `.name`) as one regex."""
    alternatives = "|".join(re.escape(name) for name in names)
    return rf"(?:.*\.)?(?:{alternatives})"


def thinker_target_regex(config: dict, config_path: Path) -> str:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return thinker_regex(targets)
    if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        if config.get("layers_to_transform") is not None:
            raise OmniAdapterError(f"{config_path}: list target_modules with layers_to_transform cannot be written as "
                                   "one regex without changing which layers PEFT adapts; write target_modules as a "
                                   "regex of the adapted module names and convert again")
        return thinker_regex(suffix_list_as_regex(targets))
    raise OmniAdapterError(f"{config_path}: target_modules is {targets!r}; expected a regex string or a list of "
                           "module names (PEFT's adapter_config.json format)")


def module_path_in(names: list[str], module: str, config_path: Path) -> list[str]:
    """The full paths of a `modules_to_save` entry (PEFT matches it as a suffix of module names)."""
    segments = module.split(".")
    paths = set()
    for name in names:
        parts = name.split(".")
        for end in range(len(segments), len(parts)):
            if parts[end - len(segments):end] == segments:
                paths.add(".".join(parts[:end]))
    if not paths:
        raise OmniAdapterError(f"{config_path}: modules_to_save lists {module!r} but the adapter holds no tensor of "
                               "it; export the adapter again")
    return sorted(paths)


def thinker_modules_to_save(config: dict, names: list[str], config_path: Path) -> list[str] | None:
    modules = config.get("modules_to_save")
    if not modules:
        return modules
    return [THINKER_PREFIX + path for module in modules for path in module_path_in(names, module, config_path)]


def refuse_untranslated_fields(config: dict, config_path: Path) -> None:
    """Fields whose module names this converter does not rewrite: refuse rather than half-convert."""
    for field in ("target_parameters", "trainable_token_indices"):
        if config.get(field):
            raise OmniAdapterError(f"{config_path}: {field} is set; adapters with {field} are not converted "
                                   "(omnitrain never writes it)")


def omni_adapter_config(config: dict, names: list[str], config_path: Path) -> dict:
    """adapter_config.json for the full model: names PEFT matches against module names prefixed."""
    refuse_untranslated_fields(config, config_path)
    converted = dict(config)
    converted["target_modules"] = thinker_target_regex(config, config_path)
    converted["modules_to_save"] = thinker_modules_to_save(config, names, config_path)
    if isinstance(config.get("exclude_modules"), str):
        converted["exclude_modules"] = thinker_regex(config["exclude_modules"])
    check_same_lora_modules(config, converted, names, config_path)
    return converted


def check_same_lora_modules(config: dict, converted: dict, names: list[str], config_path: Path) -> None:
    """Each LoRA tensor's module must match the new pattern under `thinker.` (and the old one
    without): a pattern whose anchors sit inside it (`^a|^b`) or with inline flags is refused
    here instead of loading an adapter that misses layers."""
    try:
        new = re.compile(converted["target_modules"])
    except re.error as error:
        raise OmniAdapterError(f"{config_path}: target_modules {config['target_modules']!r} cannot be prefixed with "
                               f"{THINKER_PREFIX!r} ({error}); write it without inline flags and convert again") from error
    lora_modules = sorted({name[:-len(suffix)] for name in names for suffix in LORA_SUFFIXES if name.endswith(suffix)})
    if not lora_modules:
        raise OmniAdapterError(f"{config_path.parent / ADAPTER_WEIGHTS} holds no lora_A/lora_B tensors; export the "
                               "adapter again")
    missed = [name for name in lora_modules if not new.fullmatch(THINKER_PREFIX + name)]
    if missed:
        raise OmniAdapterError(f"{config_path}: target_modules {config['target_modules']!r} does not match the adapted "
                               f"module {missed[0]} once prefixed with {THINKER_PREFIX!r} ({len(missed)} such); "
                               "write it as one regex anchored at ^ and $ and convert again")


# --- writing ----------------------------------------------------------------------------------

def check_output_folder(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OmniAdapterError(f"{out_dir} exists and is not a folder; choose a new output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise OmniAdapterError(f"{out_dir} exists and is not empty; choose a new output folder or remove this one")


def convert_thinker_adapter(adapter_dir: str | Path, out_dir: str | Path) -> dict:
    """Write the full-Omni-model version of the thinker adapter in `adapter_dir` to `out_dir`.

    Returns a summary: tensors written, the new target_modules and modules_to_save."""
    from safetensors.torch import save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config = read_adapter_config(adapter_dir)
    check_output_folder(out_dir)
    tensors, metadata = read_adapter_tensors(adapter_dir)
    names = module_names(tensors, adapter_dir)
    converted = omni_adapter_config(config, names, adapter_dir / ADAPTER_CONFIG)
    renamed = {PEFT_KEY_PREFIX + THINKER_PREFIX + name: tensors[PEFT_KEY_PREFIX + name] for name in names}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt", **metadata})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(converted, indent=2))
    return {"tensors": len(renamed), "target_modules": converted["target_modules"],
            "modules_to_save": converted["modules_to_save"], "out_dir": str(out_dir)}


# --- command line -------------------------------------------------------------------------------

def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.omni_adapter",
        description="Convert a thinker LoRA adapter (<run>/adapter, for "
                    "Qwen2_5OmniThinkerForConditionalGeneration) into one that PEFT loads onto the full "
                    "Qwen2_5OmniForConditionalGeneration (thinker + talker + token2wav, for speech output). "
                    "Tensor keys, target_modules and modules_to_save get the 'thinker.' prefix; the target "
                    "pattern is anchored so that no LoRA layer lands in the talker.")
    parser.add_argument("adapter_dir", type=Path, metavar="ADAPTER_DIR",
                        help="a thinker adapter folder (adapter_model.safetensors + adapter_config.json)")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR",
                        help="where to write the converted adapter (must not exist, or be empty)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_argument_parser().parse_args(argv)
    try:
        summary = convert_thinker_adapter(args.adapter_dir, args.out_dir)
    except OmniAdapterError as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    print(f"wrote {summary['out_dir']}: {summary['tensors']} tensors for Qwen2_5OmniForConditionalGeneration")
    print(f"  target_modules: {summary['target_modules']}")
    if summary["modules_to_save"]:
        print(f"  modules_to_save: {', '.join(summary['modules_to_save'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
