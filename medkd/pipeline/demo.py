"""The demo request: send one real test image to the endpoint, as a user's client would."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from medkd.serve.client import MedkdClient


def raw_image(dataset: Any, split: str = "test", index: int = 0) -> np.ndarray:
    """Undo the dataset's normalisation: back to the pixels a scanner export would hold.

    Returns uint8 (H, W) / (H, W, C) for 2D images and float32 [0, 1] (C, *spatial) for 3D.
    """
    image = dataset.splits[split].images[index]  # (C, *spatial), normalised
    pre = dataset.preprocessing
    channels = image.shape[0]
    mean = np.asarray(pre.get("mean", [0.0] * channels), dtype=np.float32).reshape(-1, *([1] * (image.ndim - 1)))
    std = np.asarray(pre.get("std", [1.0] * channels), dtype=np.float32).reshape(-1, *([1] * (image.ndim - 1)))
    unit = np.clip(image * std + mean, 0.0, 1.0)
    if image.ndim == 3:  # 2D: (C, H, W)
        pixels = np.clip(np.round(unit / float(pre.get("scale", 1 / 255))), 0, 255).astype(np.uint8)
        return pixels[0] if channels == 1 else np.moveaxis(pixels, 0, -1)
    return unit.astype(np.float32)


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def demo_request(url: str, dataset: Any, output_dir: Path) -> dict[str, Any]:
    """POST test image 0 (PNG for 2D, NPY for 3D) and return the endpoint's answer."""
    pixels = raw_image(dataset)
    if pixels.dtype == np.uint8:
        path = Path(output_dir) / "demo_input.png"
        path.write_bytes(encode_png(pixels))
    else:
        path = Path(output_dir) / "demo_input.npy"
        np.save(path, pixels, allow_pickle=False)
    answer = MedkdClient(url).predict(path)
    labels = dataset.splits["test"].labels
    true_label = labels[0].tolist() if dataset.task == "classification" else None
    if dataset.task == "segmentation":
        answer = {k: v for k, v in answer.items() if k not in ("mask", "mask_npy_b64")}
    return {"input": str(path), "true_label": true_label, "answer": answer}
