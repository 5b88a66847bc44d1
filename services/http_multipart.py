"""The edit form's multipart body, parsed in memory while it streams in, each part held to its limit as it grows.

Starlette's `request.form()` spools file parts to temporary files and leaves their sizes to the caller, so a
200 MiB "image" reached /tmp and memory before its 32 MiB limit was checked. Here a part stops the parse (413,
naming the part) the moment it passes its limit, and nothing touches the disk. Parsing is python-multipart's.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import python_multipart
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header


class MultipartError(Exception):
    """A malformed or over-limit body: `status` 400 or 413, `param` the part's name when known."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class Part:
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)
    disposition: bytes = b""

    @property
    def is_file(self) -> bool:
        return self.filename is not None


@dataclass(frozen=True)
class PartLimits:
    max_files: int
    max_fields: int = 1000
    file_bytes: int = 32 << 20  # one file part (an image)
    field_bytes: int = 64 << 10  # one text field (a prompt of 8192 characters is at most 32 KiB)


class _Parser:
    def __init__(self, limits: PartLimits, charset: str) -> None:
        self.limits, self.charset = limits, charset
        self.parts: list[Part] = []
        self.part = Part()
        self.files = self.fields = 0
        self._name = self._value = b""

    def _decode(self, data: bytes) -> str:
        return data.decode(self.charset, errors="replace")

    def on_part_begin(self) -> None:
        self.part = Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]
        if len(self._name) > 1024:
            raise MultipartError("a part's header is too long")

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        if len(self._value) > 8192:
            raise MultipartError("a part's header is too long")

    def on_header_end(self) -> None:
        if self._name.lower() == b"content-disposition":
            self.part.disposition = self._value
        self._name = self._value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.disposition)
        if b"name" not in options:
            raise MultipartError('a part\'s Content-Disposition needs a "name"')
        self.part.name = self._decode(options[b"name"])[:128]
        if b"filename" in options:
            self.part.filename = self._decode(options[b"filename"])[:256]
            self.files += 1
            if self.files > self.limits.max_files:
                raise MultipartError(f"too many files: the most is {self.limits.max_files}")
        else:
            self.fields += 1
            if self.fields > self.limits.max_fields:
                raise MultipartError(f"too many fields: the most is {self.limits.max_fields}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        limit = self.limits.file_bytes if self.part.is_file else self.limits.field_bytes
        if len(self.part.data) + (end - start) > limit:
            kind = "file part" if self.part.is_file else "field"
            raise MultipartError(f"{self.part.name}: the {kind} exceeds {limit} bytes", 413, self.part.name)
        self.part.data += data[start:end]

    def on_part_end(self) -> None:
        self.parts.append(self.part)

    def on_end(self) -> None:
        pass


async def parse_multipart(content_type: str, stream: AsyncIterator[bytes], limits: PartLimits) -> list[Part]:
    """The parts of a `multipart/form-data` body read from `stream`, in order."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise MultipartError("expected a multipart/form-data body")
    if b"boundary" not in params:
        raise MultipartError("missing boundary in multipart")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"
    parser = _Parser(limits, charset)
    callbacks = {name: getattr(parser, name) for name in dir(parser) if name.startswith("on_")}
    try:
        reader = python_multipart.MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
        async for chunk in stream:
            reader.write(chunk)
        reader.finalize()
    except FormParserError as exc:
        raise MultipartError("invalid multipart data") from exc
    return parser.parts
