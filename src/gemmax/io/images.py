"""Images in chat messages: OpenAI-style content parts and ``data:`` URIs, read into PIL images.

A message's ``content`` may be a list of parts; the image ones are

* ``{"type": "image", "image": ...}``: a PIL image, an ``[H, W(, C)]`` array, a file path or a ``data:`` URI
  (transformers' chat format, which also allows ``"url"`` / ``"path"`` in place of ``"image"``);
* ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``: OpenAI's, where only
  ``data:`` URIs are read (gemmax fetches nothing from the network).

The chat templates write one image placeholder per part; :func:`message_images` gives the images in the same
order, which is the order a multimodal family's ``encode_prompt`` fills them in.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

#: The image formats a ``data:`` URI may carry.
DATA_URI_TYPES = ("image/png", "image/jpeg", "image/jpg")
IMAGE_PART_TYPES = ("image", "image_url")


def image_from_data_uri(url: str) -> Any:
    """A ``data:image/png;base64,...`` (or JPEG) URI -> an RGB PIL image. Anything else -> ValueError naming
    what is wrong (another scheme, another media type, not base64, not an image)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if isinstance(url, str) and ":" in url else repr(url)[:40]
        raise ValueError(f"image URLs must be data: URIs (base64 PNG or JPEG); got the scheme {scheme!r} "
                         "(gemmax fetches nothing from the network)")
    head, sep, data = url[5:].partition(",")
    if not sep:
        raise ValueError("a data: URI needs a ',' between its header and its data")
    media, *params = head.split(";")
    if media.lower() not in DATA_URI_TYPES:
        raise ValueError(f"data: URI of type {media!r}: images must be {', '.join(DATA_URI_TYPES[:2])}")
    if "base64" not in params:
        raise ValueError("data: URI images must be base64-encoded (';base64,')")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the data: URI's base64 data does not decode") from None
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"the data: URI does not hold a readable {media} image") from None
    return img.convert("RGB")


def load_image(source: Any) -> Any:
    """A PIL image or an array as is; a ``data:`` URI or a file path read into a PIL image."""
    if isinstance(source, str | os.PathLike):
        s = os.fspath(source)
        if s.startswith("data:"):
            return image_from_data_uri(s)
        if "://" in s:
            return image_from_data_uri(s)  # raises: only data: URIs are read
        from PIL import Image

        with Image.open(s) as img:
            return img.convert("RGB")
    return source


def part_image(part: Mapping[str, Any]) -> Any:
    """The image of one content part (see the module docstring)."""
    kind = part.get("type")
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        if url is None:
            raise ValueError("an image_url part needs image_url.url")
        return image_from_data_uri(url)
    if kind == "image":
        for key in ("image", "url", "path"):
            if part.get(key) is not None:
                return load_image(part[key])
        raise ValueError("an image part needs 'image' (or 'url' / 'path')")
    raise ValueError(f"not an image part: type {kind!r}")


def message_images(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Every image of the messages' content parts, in order."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, Sequence) and not isinstance(content, str):
            out += [part_image(p) for p in content if isinstance(p, Mapping) and p.get("type") in IMAGE_PART_TYPES]
    return out
