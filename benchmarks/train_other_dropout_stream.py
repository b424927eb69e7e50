"""Train one run as the `train` stage does, on the plain path (torch's kernels, the fused CPU
kernels off), with another dropout stream: the same initial weights and data order, torch's
generator reseeded with seed + `--offset` right after the model is built. After that point the
generator feeds only the dropout masks (the shuffle has a generator of its own), so the run
shows how far the plain path moves when nothing but its masks change: what "the same seed"
can promise a path whose masks come from another generator (docs/speed.md, "Same results").

    python benchmarks/train_other_dropout_stream.py --offset 1000003 \\
        --config configs/final.json --seed 0 --out OUT --checkpoint OUT/ckpt.pt
"""

import argparse
import sys

import torch

from stages import kernels, train, training
from stages.errors import run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--offset", type=int, required=True, help="added to the seed")
    args, train_args = parser.parse_known_args()
    kernels.use = False
    build_model = training.build_model

    def build_then_reseed(cfg, seed):
        model = build_model(cfg, seed)
        torch.manual_seed(seed + args.offset)
        return model

    training.build_model = build_then_reseed  # `fit` builds the model through this name
    sys.argv = [sys.argv[0], *train_args]
    run_cli(train.main)


if __name__ == "__main__":
    main()
