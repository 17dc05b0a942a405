"""Small offline image classification datasets, preprocessed for the DINOv2 backbone of `offline.dinov2`.

Both come from installed packages, so benchmarks need no network:

- `digits`: scikit-learn's bundled 8x8 grey digits (1797 images, 10 classes), upsampled to RGB.
- `textile`: the simulated textile images of `conformal-clip-data` (250x250, 2000 images); the label is the folder a
  file sits in: `nominal` (1000), `local` defect (500) or `global` defect (500).

Splits are stratified and depend only on the seed. Only the images in the split are decoded and resized (about 1 ms
per textile image), so there is no on-disk cache.

`python -m examples.offline.images --textile-subset DIR` copies a stratified subset of the textile folders (600
images, 13 MB: enough for 300/300 splits) for machines without conformal-clip-data, such as the GPU machine; then
`TEXTILE_ROOT=DIR bash benchmarks/gpu_quality.sh`.
"""

import argparse
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from .dinov2 import prepare_pixels

TEXTILE_CLASSES = ("nominal", "local", "global")


class Splits(NamedTuple):
    """Normalized images of shape (N, 3, size, size), float32, with int64 labels indexing `class_names`."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: tuple[str, ...]


def _stratified_indices(labels: np.ndarray, n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n_train + n_test > len(labels):
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {len(labels)} available images")
    indices = np.arange(len(labels))
    train, rest = train_test_split(indices, train_size=n_train, stratify=labels, random_state=seed)
    if n_test == len(rest):
        return train, rest
    test, _ = train_test_split(rest, train_size=n_test, stratify=labels[rest], random_state=seed)
    return train, test


def load_digits(size: int = 112, n_train: int = 500, n_test: int = 500, seed: int = 0) -> Splits:
    """scikit-learn digits as RGB images of `size` x `size` (bilinear upsampling of the 8x8 originals)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    train, test = _stratified_indices(digits.target, n_train, n_test, seed)

    def prepare(indices):
        grey = torch.tensor(digits.images[indices], dtype=torch.float32).unsqueeze(1) / 16.0
        return prepare_pixels(grey.expand(-1, 3, -1, -1), size), torch.tensor(digits.target[indices])

    return Splits(*prepare(train), *prepare(test), tuple(str(name) for name in digits.target_names))


def textile_files(root: Path | None = None) -> tuple[list, np.ndarray]:
    """All textile image paths and their labels (index into `TEXTILE_CLASSES`), in a fixed order.

    `root` holds one folder per class; by default the one installed by `conformal-clip-data`.
    """
    if root is None:
        from conformal_clip_data import textile_simulated_root

        root = textile_simulated_root()
    root = Path(root)
    paths, labels = [], []
    for label, name in enumerate(TEXTILE_CLASSES):
        class_paths = sorted((root / name).glob("*.jpg"))
        if not class_paths:
            raise FileNotFoundError(f"No images in {root / name}")
        paths += class_paths
        labels += [label] * len(class_paths)
    return paths, np.array(labels)


def load_textile(
    size: int = 112, n_train: int = 300, n_test: int = 300, seed: int = 0, root: Path | None = None
) -> Splits:
    """conformal-clip-data textiles (or a copy of their folders at `root`), area-resampled from 250x250 to `size`."""
    from PIL import Image

    paths, labels = textile_files(root)
    train, test = _stratified_indices(labels, n_train, n_test, seed)

    def prepare(indices):
        # PIL's box filter is area averaging like cv2.INTER_AREA, and much faster on uint8 than torch on floats.
        pixels = np.stack(
            [np.asarray(Image.open(paths[i]).convert("RGB").resize((size, size), Image.BOX)) for i in indices]
        )
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
        return prepare_pixels(images, size), torch.from_numpy(labels[indices])

    return Splits(*prepare(train), *prepare(test), TEXTILE_CLASSES)


def copy_textile_subset(destination: Path, n: int = 600, seed: int = 0, root: Path | None = None) -> list[Path]:
    """Copy a stratified `n` of the textile images into `destination`, one folder per class as in the original."""
    paths, labels = textile_files(root)
    chosen, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
    copies = []
    for index in sorted(chosen):
        folder = Path(destination) / TEXTILE_CLASSES[labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        copies.append(Path(shutil.copy2(paths[index], folder)))
    return copies


DATASETS = {"digits": load_digits, "textile": load_textile}


def load_dataset(name: str, size: int = 112, n_train: int = 300, n_test: int = 300, seed: int = 0, **options) -> Splits:
    """`options` go to the dataset's loader (`root` for textile)."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}, choose from {sorted(DATASETS)}")
    return DATASETS[name](size=size, n_train=n_train, n_test=n_test, seed=seed, **options)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--textile-subset", type=Path, required=True, metavar="DIR", help="where to copy the subset")
    parser.add_argument("--n", type=int, default=600, help="images in the subset, stratified by class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    copies = copy_textile_subset(args.textile_subset, args.n, args.seed)
    size = sum(path.stat().st_size for path in copies)
    print(f"copied {len(copies)} textile images ({size / 1e6:.1f} MB) to {args.textile_subset}")


if __name__ == "__main__":
    main()
