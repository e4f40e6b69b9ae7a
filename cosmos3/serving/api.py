"""Request bodies of the generation API: limits, errors in OpenAI's shape, JSON / multipart parsing, typed fields.

Every refusal is an `ApiError` that the server answers as OpenAI does,
``{"error": {"message", "type", "param", "code"}}``, with `param` naming the field. JSON fields must have their
JSON types (a number given as a string is refused); multipart form fields are text, so there numbers are parsed.
Unknown fields are refused, so a misspelt option fails instead of being ignored.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, fields
from email import policy
from email.parser import BytesParser
from typing import Any


class ApiError(Exception):
    """An HTTP error reply: `status`, a message for the user, the field it is about (`param`) and a short `code`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for (`cosmos3 serve --max-*`); requests over a limit get 400 naming the field.

    Args:
        max_pixels: output height x width.
        max_frames: frames of a generated video, and of an uploaded clip.
        max_steps: denoising steps.
        max_n: images per image request.
        max_chunk: actions per world-action chunk.
        max_prompt_chars: length of a prompt or negative prompt.
        max_body_bytes: an HTTP request body (413 beyond it, before it is read).
        max_queue: jobs waiting for the model (429 beyond it).
        max_finished_jobs: finished jobs (and their videos) kept in memory.
        job_ttl_s: seconds a finished job stays readable.
        max_input_side: width and height of an uploaded image or clip.
    """

    max_pixels: int = 1280 * 720
    max_frames: int = 121
    max_steps: int = 50
    max_n: int = 4
    max_chunk: int = 32
    max_prompt_chars: int = 2000
    max_body_bytes: int = 32 << 20
    max_queue: int = 8
    max_finished_jobs: int = 32
    job_ttl_s: float = 3600.0
    max_input_side: int = 4096

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"ServeLimits.{f.name} must be a positive number, got {value!r}.")
            if f.type == "int" and not isinstance(value, int):
                raise ValueError(f"ServeLimits.{f.name} must be an int, got {value!r}.")
        if self.max_pixels < 256:
            raise ValueError(f"ServeLimits.max_pixels must allow a 16x16 output (>= 256), got {self.max_pixels}.")


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart body."""

    data: bytes
    filename: str | None
    content_type: str | None


# ------------------------------------------------------------------------------------------------------------------
# Bodies
# ------------------------------------------------------------------------------------------------------------------


def parse_body(content_type: str | None, body: bytes) -> tuple[dict, bool]:
    """The request's fields and whether they came from a form (multipart: text values, `Upload` files)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == "application/json":
        try:
            fields_ = json.loads(body)
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"The body is not valid JSON: {e}.", code="invalid_json") from None
        if not isinstance(fields_, dict):
            raise ApiError(400, f"The body must be a JSON object, got {type(fields_).__name__}.",
                           code="invalid_json")
        return fields_, False
    if kind == "multipart/form-data":
        return _parse_multipart(content_type, body), True
    raise ApiError(415, f"Content-Type must be application/json or multipart/form-data, got {content_type!r}.",
                   code="unsupported_media_type")


def _parse_multipart(content_type: str, body: bytes) -> dict:
    if "boundary=" not in content_type:
        raise ApiError(400, "multipart/form-data without a boundary.", code="invalid_multipart")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart() or message.defects:
        raise ApiError(400, "The multipart body could not be parsed.", code="invalid_multipart")
    out: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise ApiError(400, "A multipart part has no name.", code="invalid_multipart")
        if name in out:
            raise ApiError(400, f"Field {name!r} is given twice.", param=name)
        data = part.get_payload(decode=True) or b""
        if part.get_filename() is not None:
            out[name] = Upload(data, part.get_filename(), part.get_content_type())
        else:
            try:
                out[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, f"Field {name!r} is not UTF-8 text.", param=name) from None
    return out


class Fields:
    """Typed reads of one request's fields. `done()` refuses whatever was not read (unknown or misspelt fields)."""

    def __init__(self, values: dict, form: bool):
        self.values, self.form, self.read = values, form, set()

    def __contains__(self, name: str) -> bool:
        return self.values.get(name) is not None

    def raw(self, name: str) -> Any:
        self.read.add(name)
        return self.values.get(name)

    def done(self) -> None:
        unknown = sorted(set(self.values) - self.read)
        if unknown:
            raise ApiError(400, f"Unknown field {unknown[0]!r}; this endpoint takes {sorted(self.read)}.",
                           param=unknown[0], code="unknown_parameter")

    def text(self, name: str, *, limit: int, required: bool = False) -> str | None:
        value = self.raw(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise ApiError(400, f"`{name}` is required: describe what to generate.", param=name,
                               code="missing_required_parameter")
            return None
        if not isinstance(value, str):
            raise ApiError(400, f"`{name}` must be a string, got {_kind(value)}.", param=name)
        value = value.strip()
        if len(value) > limit:
            raise ApiError(400, f"`{name}` is {len(value)} characters long; the limit is {limit}.", param=name)
        return value

    def choice(self, name: str, valid: tuple[str, ...], default: str | None) -> str | None:
        value = self.raw(name)
        if value is None:
            return default
        if value not in valid:
            raise ApiError(400, f"`{name}` must be one of {list(valid)}, got {value!r}.", param=name)
        return value

    def number(self, name: str, *, low: float, high: float, default: float | None, integer: bool = False,
               low_open: bool = False) -> float | int | None:
        value = self.raw(name)
        if value is None:
            return default
        kind = "an integer" if integer else "a number"
        if self.form and isinstance(value, str):
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                raise ApiError(400, f"`{name}` must be {kind}, got {value!r}.", param=name) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise ApiError(400, f"`{name}` must be {kind}, got {_kind(value)} {value!r}.", param=name)
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise ApiError(400, f"`{name}` must be in {bracket}{low:g}, {high:g}], got {value!r}.", param=name)
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if self.form and value in ("true", "false"):
            return value == "true"
        if not isinstance(value, bool):
            raise ApiError(400, f"`{name}` must be true or false, got {value!r}.", param=name)
        return value

    def size(self, name: str, default: tuple[int, int], *, factor: int, max_pixels: int) -> tuple[int, int]:
        """`"WIDTHxHEIGHT"` (OpenAI's order) -> (height, width), each a multiple of `factor`, within `max_pixels`."""
        value = self.raw(name)
        if value is None:
            height, width = default
        else:
            match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value) if isinstance(value, str) else None
            if match is None:
                raise ApiError(400, f"`{name}` must be a string 'WIDTHxHEIGHT' such as '832x480', got {value!r}.",
                               param=name)
            width, height = int(match[1]), int(match[2])
        if width % factor or height % factor or not width or not height:
            raise ApiError(400, f"`{name}` {width}x{height}: width and height must be positive multiples of {factor} "
                           "(the model's patch size in pixels).", param=name)
        if width * height > max_pixels:
            given = "" if value is not None else " (the default: give a smaller one)"
            raise ApiError(400, f"`{name}` {width}x{height}{given} is {width * height} pixels; the limit is "
                           f"{max_pixels} (--max-pixels).", param=name)
        return height, width

    def media(self, name: str) -> bytes | None:
        """A file: a multipart upload, or in JSON a base64 string (a `data:...;base64,` URL works too)."""
        value = self.raw(name)
        if value is None:
            return None
        if isinstance(value, Upload):
            return value.data
        if isinstance(value, str):
            if value.startswith("data:"):
                value = value.partition(",")[2]
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"`{name}` is not base64 (give the file's bytes base64-encoded, or upload it as "
                               "a multipart file).", param=name) from None
        raise ApiError(400, f"`{name}` must be a base64 string or a multipart file, got {_kind(value)}.", param=name)


def _kind(value: Any) -> str:
    return {bool: "a boolean", str: "a string", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__)


def decode_image(data: bytes, name: str, limits: ServeLimits):
    """Uploaded image bytes -> `[H, W, 3]` uint8, decoded in the isolated decoder process (untrusted input)."""
    from .. import io as cio

    side = limits.max_input_side
    media = cio.MediaLimits(max_bytes=limits.max_body_bytes, max_width=side, max_height=side,
                            max_pixels=side * side, timeout_s=60.0)
    with tempfile.TemporaryDirectory(prefix="cosmos3-serve-") as folder:
        path = os.path.join(folder, "upload")
        with open(path, "wb") as f:
            f.write(data)
        try:
            image = cio.read_image(path, limits=media)
        except cio.MediaDecodeError as e:
            raise ApiError(400, f"`{name}` is not a readable image (PNG, JPEG or WebP): {_first(e)}",
                           param=name) from None
    if min(image.shape[:2]) < 16:
        raise ApiError(400, f"`{name}` is {image.shape[1]}x{image.shape[0]}; each side must be >= 16 pixels.",
                       param=name)
    return image


def decode_video(data: bytes, name: str, limits: ServeLimits):
    """Uploaded video bytes -> `VideoClip` (frames `[T, H, W, 3]` uint8), isolated; longer than `max_frames` is
    refused rather than cut."""
    from .. import io as cio

    side = limits.max_input_side
    media = cio.MediaLimits(max_bytes=limits.max_body_bytes, max_width=side, max_height=side,
                            max_pixels=side * side, timeout_s=120.0)
    with tempfile.TemporaryDirectory(prefix="cosmos3-serve-") as folder:
        path = os.path.join(folder, "upload.mp4")
        with open(path, "wb") as f:
            f.write(data)
        try:
            clip = cio.read_video(path, max_frames=limits.max_frames + 1, limits=media)
        except cio.MediaDecodeError as e:
            raise ApiError(400, f"`{name}` is not a readable video: {_first(e)}", param=name) from None
    if len(clip.frames) > limits.max_frames:
        raise ApiError(400, f"`{name}` has more than {limits.max_frames} frames (--max-frames).", param=name)
    if len(clip.frames) == 0 or min(clip.frames.shape[1:3]) < 16:
        raise ApiError(400, f"`{name}` must have frames of at least 16x16 pixels.", param=name)
    return clip


def _first(error: Exception) -> str:
    line = (str(error).strip().splitlines() or [""])[0]
    return line[:300]
