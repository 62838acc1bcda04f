"""omnitrain: LoRA instruction tuning of Qwen2.5-Omni's thinker on speech tasks.

    torchrun --nproc_per_node=2 engine/train.py --recipe hybrid [key=value ...]
    python engine/train.py --recipe random max_steps=20 optim.lr=2e-4

Parse the recipe and overrides, build, train, close; everything else lives in engine/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun engine/train.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import ConfigError, available_recipes, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="hybrid", help=f"recipe name ({', '.join(available_recipes())}) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. optim.lr=2e-4 max_steps=50")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"omnitrain: config error: {e}", file=sys.stderr)
        return 2

    from engine.runner import run_training

    run_training(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
