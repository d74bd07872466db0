"""Exports a workdir's checkpoint as a Hugging Face transformers folder (README, "Hugging Face").

    python -m vlm_jax.export --workdir=DIR [--step=N] --out=DIR2 [--as=auto|siglip|clip|paligemma|vision]

auto picks the model's exact class (SiglipModel, CLIPModel, PaliGemmaForConditionalGeneration, or the vision tower
of a captioner / CoCa); a model with none gets one line naming what differs. Needs the `hf` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vlm_jax.evaluate import USER_ERRORS
from vlm_jax.hf.export import KINDS, export_run, load_run
from vlm_jax.hf.weights import DEFAULT_SHARD_BYTES


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with the folder written; 2 (one `error:` line) for bad input."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True, help="the transformers folder to write (replaced if it exists)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--as", dest="kind", default="auto", choices=KINDS)
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30,
                        help="safetensors shard size past which the weights are split (with an index)")
    args = parser.parse_args(argv)
    try:
        config, step, params = load_run(args.workdir, args.step)
        summary = export_run(config, step, params, args.out, args.kind, args.workdir,
                             int(args.max_shard_gb * 2**30))
    except (*USER_ERRORS, ImportError) as e:
        if os.environ.get("VLM_JAX_TRACEBACK"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, ImportError):
            message = f"{message} (the export needs the hf extra: pip install -e '.[hf]')"
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
