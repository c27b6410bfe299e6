"""What a request's body is allowed to be: read under a byte cap, split into images (a raw body is one
image, multipart/form-data parts are several, capped in number), each judged by its magic number, and
every refusal an :class:`InputError` carrying its HTTP status (400, 413, 415, 422) and message.

The multipart parser is our own ~40 lines of stdlib rather than python-multipart, for three reasons
(checked against python-multipart 0.0.34): it is not installed with this project - FastAPI lists it only
under its ``standard`` extra, so using it would add a dependency every Ray node must carry; it refuses a
preamble before the first delimiter, which RFC 2046 allows and this parser skips; and it reports a
truncated body (no close delimiter) only by never calling its end callback, where this parser raises a
clear 400. The caps do not depend on the parser: the whole body is capped (413) before it is parsed.
"""

import email.message
from dataclasses import dataclass

from lxn_ray.images.decode import NOT_AN_IMAGE, ImageRejected, image_format

MULTIPART_TYPE = "multipart/form-data"
SINGLE_FIELD = "file"  # the field of /predict and /explain
BATCH_FIELDS = ("files", "file")  # the fields of /predict/batch


class InputError(Exception):
    """A request the endpoint refuses: HTTP status, a short reason for the metrics, a message for people."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header value, lower case, without parameters ('' for None)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def rejected_image(error: ImageRejected, where: str = "") -> InputError:
    """Map :class:`ImageRejected` to a status: too many pixels or bytes 413, bytes that are no image format
    415, a DICOM object that is not a chest film 422 (its reason), anything else 400."""
    from lxn_ray.images.dicom import UnsupportedDicom

    message = str(error)
    prefix = f"{where}: " if where else ""
    if isinstance(error, UnsupportedDicom):
        return InputError(422, error.reason, prefix + message)
    if "pixel cap" in message or "decompression bomb" in message:
        return InputError(413, "too_many_pixels", prefix + message)
    if "byte cap" in message:
        return InputError(413, "too_large", prefix + message)
    if message == "empty file":
        return InputError(400, "empty", prefix + message)
    if message == NOT_AN_IMAGE:
        return InputError(415, "unsupported_media_type", prefix + message)
    return InputError(400, "corrupt_image", prefix + message)


@dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body."""

    name: str | None
    filename: str | None
    content_type: str | None
    data: bytes


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """The parts of a multipart/form-data ``body`` in body order (RFC 7578 over RFC 2046; stdlib only).

    Only what uploads need: the boundary from ``content_type``, per-part headers, and each part's bytes
    taken verbatim (no transfer encodings). A preamble before the first delimiter and an epilogue after
    the close delimiter are skipped. Raises :class:`InputError` (400, ``malformed_multipart``) for a
    missing or over-long (> 200 characters) boundary, a body without parts, a part without a header
    block, or a body without its close delimiter (truncated).
    """
    header = email.message.Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise InputError(400, "malformed_multipart", "multipart body without a valid boundary parameter")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    sections = (b"\r\n" + body).split(delimiter)
    if len(sections) < 2:
        raise InputError(400, "malformed_multipart", "multipart body has no parts")
    parts: list[Part] = []
    for section in sections[1:]:
        if section.startswith(b"--"):  # the close delimiter: the rest is epilogue
            return parts
        head, separator, data = section.partition(b"\r\n\r\n")
        if not separator:
            raise InputError(400, "malformed_multipart", "multipart part without a header block")
        headers = email.message.Message()
        for line in head.split(b"\r\n")[1:]:  # the first line is the delimiter line's padding
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                headers[name.strip()] = value.strip()
        disposition = headers.get("content-disposition")
        part_name = filename = None
        if disposition:
            holder = email.message.Message()
            holder["content-disposition"] = disposition
            part_name = holder.get_param("name", header="content-disposition")
            filename = holder.get_param("filename", header="content-disposition")
        parts.append(
            Part(
                name=part_name if isinstance(part_name, str) else None,
                filename=filename if isinstance(filename, str) else None,
                content_type=headers.get("content-type"),
                data=data,
            )
        )
    raise InputError(400, "malformed_multipart", "multipart body is truncated (no closing boundary)")


async def read_body(request, limit: int) -> bytes:
    """The body of ``request`` (a Starlette request), refused past ``limit`` bytes: by Content-Length
    before reading, and while reading (a chunked upload declares no length).

    Raises :class:`InputError`: 413 (``too_large``) over ``limit``, 400 for a Content-Length that is no
    integer."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise InputError(400, "bad_content_length", f"invalid Content-Length {declared!r}") from None
        if length > limit:
            raise InputError(413, "too_large", f"body is {length} bytes, over the {limit}-byte limit")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise InputError(413, "too_large", f"body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request, many: bool, max_body_bytes: int, max_images: int) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the request's images, in the order sent; a raw body is one image (named
    ``body``), multipart may be several.

    A multipart/form-data request is parsed into parts and its ``file`` field (``files`` or ``file`` when
    ``many``) kept; any other body is one image, whatever its Content-Type says. Each image's type is then
    judged by its magic number; declared types, the request's or a part's, are ignored.

    Raises :class:`InputError`: 413 for a body over ``max_body_bytes`` or more than ``max_images`` parts;
    415 for bytes that are not PNG, JPEG or DICOM; 400 for an empty body or part, a multipart body without
    the field, several images when not ``many``, or a malformed multipart body."""
    content_type = request.headers.get("content-type")
    body = await read_body(request, max_body_bytes)
    if not body:
        raise InputError(400, "empty", "empty body")
    if media_type(content_type) != MULTIPART_TYPE:
        return [_judged("body", body)]
    fields = BATCH_FIELDS if many else (SINGLE_FIELD,)
    parts = [part for part in parse_multipart(body, content_type or "") if part.name in fields]
    if not parts:
        raise InputError(400, "missing_file", f"multipart body has no {' or '.join(fields)} field")
    if not many and len(parts) > 1:
        raise InputError(400, "too_many_images", "one image per /predict; use /predict/batch for several")
    if len(parts) > max_images:
        raise InputError(413, "too_many_images", f"{len(parts)} images, over {max_images}")
    images = []
    for index, part in enumerate(parts):
        name = f"image {index} ({part.filename or part.name})"
        if not part.data:
            raise InputError(400, "empty", f"{name}: empty file")
        images.append(_judged(name, part.data))
    return images


def _judged(name: str, data: bytes) -> tuple[str, bytes]:
    """``(name, data)`` when the bytes are PNG, JPEG or DICOM by their magic number; else 415."""
    if image_format(data) is None:
        raise InputError(
            415,
            "unsupported_media_type",
            ("" if name == "body" else f"{name}: ") + f"{NOT_AN_IMAGE} (judged by its bytes, not its label)",
        )
    return name, data
