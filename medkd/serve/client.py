"""A small HTTP client for a medkd endpoint (standard library only).

Examples:
    >>> client = MedkdClient("http://127.0.0.1:8000")  # doctest: +SKIP
    >>> client.predict("scan.png")["predicted_label"]  # doctest: +SKIP
    'benign'
    >>> client.predict(np.zeros((28, 28), np.uint8))["probabilities"]  # doctest: +SKIP
    [0.31, 0.69]
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from medkd.serve.codecs import encode_npy

FILE_CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".dcm": "application/dicom",
    ".dicom": "application/dicom",
    ".npy": "application/x-npy",
    ".json": "application/json",
}


class ServeRequestError(RuntimeError):
    """The endpoint answered 4xx/5xx (``status``) or could not be reached (``status`` None)."""

    def __init__(self, message: str, *, status: int | None = None, url: str = "") -> None:
        super().__init__(f"{url}: HTTP {status}: {message}" if status else f"{url}: {message}")
        self.message = message
        self.status = status
        self.url = url


class MedkdClient:
    """Calls the routes of a medkd Serve application.

    Args:
        url: base URL returned by :func:`medkd.serve.app.deploy`, e.g. ``http://127.0.0.1:8000``.
        timeout: default seconds to wait for an answer.
        token: bearer token of an endpoint started with ``serve.auth_token_env``.
        model: model id to ask (sent as ``serve_multiplexed_model_id``); None: the default model.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, token: str | None = None, model: str | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url: must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._token = token
        self.model = model

    def predict(self, image: np.ndarray | str | Path, *, timeout: float | None = None) -> dict[str, Any]:
        """Predict one image: an array (sent as NPY) or a .png/.jpg/.dcm/.npy/.json file."""
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"image: {path} does not exist")
            body = path.read_bytes()
            content_type = FILE_CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        else:
            body, content_type = encode_npy(np.asarray(image)), "application/x-npy"
        return self._json("POST", "/predict", body, content_type, timeout)

    def predict_batch(self, images: np.ndarray, *, timeout: float | None = None) -> dict[str, Any]:
        """Predict a stack of images ``(N, ...)``; the answer has ``predictions`` in order."""
        images = np.asarray(images)
        if images.ndim < 3:
            raise ValueError(f"images: expected a stack (N, ...) with N first, got shape {images.shape}")
        return self._json("POST", "/predict/batch", encode_npy(images), "application/x-npy", timeout)

    def health(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._json("GET", "/healthz", None, None, timeout)

    def ready(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._json("GET", "/readyz", None, None, timeout)

    def models(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Every served model with its metrics, size and latency; ``default`` names the default."""
        return self._json("GET", "/models", None, None, timeout)

    def metadata(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._json("GET", "/metadata", None, None, timeout)

    def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Request and batch-size counters of the replica that answers."""
        return self._json("GET", "/stats", None, None, timeout)

    def _json(
        self, method: str, route: str, body: bytes | None, content_type: str | None, timeout: float | None
    ) -> dict[str, Any]:
        url = self.url + route
        request = urllib.request.Request(url, data=body, method=method)
        request.add_header("Accept", "application/json")
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        if self.model:
            request.add_header("serve_multiplexed_model_id", self.model)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            raise ServeRequestError(_error_message(error.read()), status=error.code, url=url) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ServeRequestError(f"cannot reach the endpoint: {reason}", url=url) from None
        try:
            return json.loads(payload)
        except json.JSONDecodeError:
            raise ServeRequestError(f"answer is not JSON: {payload[:200]!r}", status=200, url=url) from None


def _error_message(payload: bytes) -> str:
    try:
        document = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return payload[:500].decode("utf-8", "replace") or "no message"
    if isinstance(document, dict) and "error" in document:
        return str(document["error"])
    return json.dumps(document)[:500]
