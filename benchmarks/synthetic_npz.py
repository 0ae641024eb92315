"""Write medkd's synthetic classification data as a MedMNIST-format ``.npz`` (for budget runs).

    python -m benchmarks.synthetic_npz --output /tmp/medkd-bench/synthmnist5000.npz
        [--num-train 5000] [--num-val 500] [--num-test 1000] [--difficulty 0.7] [--num-classes 2] [--seed 0]

No MedMNIST file in ``../shared/data`` has 5,000 training images, so the 5,000-image time budget
of ``benchmarks.students`` is measured on this file: 28x28 grey images, ``uint8``, the keys of a
MedMNIST v2 file (``train_images`` ``(N, 28, 28)``, ``train_labels`` ``(N, 1)``, ...). Deterministic:
the same arguments write the same arrays.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def write_npz(
    output: Path, *, num_train: int, num_val: int, num_test: int, difficulty: float, num_classes: int, seed: int
) -> dict[str, tuple[int, ...]]:
    from medkd.data.synthetic import generate_split
    from medkd.spec.data import SyntheticDataSpec

    spec = SyntheticDataSpec(
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        difficulty=difficulty,
        num_classes=num_classes,
        seed=seed,
        image_size=28,
        in_channels=1,
    )
    arrays = {}
    for split in ("train", "val", "test"):
        part = generate_split(spec, split)
        arrays[f"{split}_images"] = part.images[:, 0].astype(np.uint8)  # (N, 1, 28, 28) -> MedMNIST's (N, 28, 28)
        arrays[f"{split}_labels"] = part.labels.reshape(-1, 1).astype(np.uint8)
    output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(output, **arrays)
    return {key: value.shape for key, value in arrays.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.synthetic_npz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="the .npz to write")
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--difficulty", type=float, default=0.7, help="0 = clean, 1 = hard")
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("num_train", "num_val", "num_test"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if not 0 <= args.difficulty <= 1:
        parser.error(f"--difficulty must be in [0, 1], got {args.difficulty}")
    if args.output.suffix != ".npz":
        parser.error(f"--output {args.output}: a .npz path expected")
    shapes = write_npz(
        args.output,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        difficulty=args.difficulty,
        num_classes=args.num_classes,
        seed=args.seed,
    )
    print(f"wrote {args.output}: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
