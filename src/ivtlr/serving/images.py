"""Reading a chat request's ``image_url``: a base64 data URL always; a local file or a remote URL only when the
server was started to allow it. Whatever the source, the bytes must decode as an image within the pixel limit."""
from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ivtlr.serving.errors import bad_request
from ivtlr.serving.limits import ServeLimits

PARAM = "messages.content.image_url"


def read_image(url: str, limits: ServeLimits) -> Image.Image:
    """The RGB picture ``url`` names; a 400 that says what to fix otherwise."""
    return decode_image(_image_bytes(url, limits), limits)


def _image_bytes(url: str, limits: ServeLimits) -> bytes:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "data":
        return _data_url_bytes(url)
    if scheme == "file":
        return _local_file_bytes(url, limits)
    if scheme in ("http", "https"):
        return _remote_bytes(url, limits)
    raise bad_request(f"image_url must be a data URL (data:image/png;base64,...), got scheme {scheme or 'none'!r}",
                      PARAM, "invalid_image_url")


def _data_url_bytes(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise bad_request("a data URL image must be base64: data:image/<type>;base64,<data>", PARAM,
                          "invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise bad_request(f"the data URL's base64 does not decode ({error})", PARAM, "invalid_image_url") from error


def _local_file_bytes(url: str, limits: ServeLimits) -> bytes:
    if limits.local_image_dir is None:
        raise bad_request("file:// images are off on this server (start it with --local-image-dir DIR)", PARAM,
                          "image_source_not_allowed")
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
    root = limits.local_image_dir.resolve()
    if not path.is_relative_to(root):
        raise bad_request(f"{path} is outside the server's image directory {root}", PARAM, "image_source_not_allowed")
    if not path.is_file():
        raise bad_request(f"no image file at {path}", PARAM, "invalid_image_url")
    if path.stat().st_size > limits.max_body_bytes:
        raise bad_request(f"{path} is larger than {limits.max_body_bytes} bytes", PARAM, "image_too_large")
    return path.read_bytes()


def _remote_bytes(url: str, limits: ServeLimits) -> bytes:
    if not limits.allow_remote_images:
        raise bad_request("remote images are off on this server (start it with --allow-remote-images); send a "
                          "data URL", PARAM, "image_source_not_allowed")
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as response:  # noqa: S310 (opt-in)
            data = response.read(limits.max_body_bytes + 1)
    except OSError as error:
        raise bad_request(f"cannot fetch {url} ({error})", PARAM, "image_fetch_failed") from error
    if len(data) > limits.max_body_bytes:
        raise bad_request(f"{url} is larger than {limits.max_body_bytes} bytes", PARAM, "image_too_large")
    return data


def decode_image(data: bytes, limits: ServeLimits) -> Image.Image:
    """Decode, refusing what is not an image or has more pixels than allowed (checked before the pixels load)."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise bad_request(f"the image is too large to decode safely ({error})", PARAM, "image_too_large") from error
    except (UnidentifiedImageError, OSError) as error:
        raise bad_request("the image_url data is not an image PIL can read", PARAM, "invalid_image") from error
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise bad_request(f"the image has {width}x{height} pixels, more than this server's limit of "
                          f"{limits.max_image_pixels}", PARAM, "image_too_large")
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as error:  # truncated or damaged data behind a valid header
        raise bad_request(f"the image does not decode ({error})", PARAM, "invalid_image") from error


def image_data_url(image: Image.Image) -> str:
    """``image`` as a PNG data URL, the form clients send (lossless: the server decodes the same pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
