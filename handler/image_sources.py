"""Turn one image reference from a request into an RGB PIL image, within the configured limits.

Torch-free. A reference is one of:

- plain base64, or a ``data:image/<type>;base64,`` URL;
- ``s3://bucket/key``, only for buckets in ``config.s3_allowed_buckets``; the client is boto3's
  default (standard AWS environment: credentials, region, ``AWS_ENDPOINT_URL_S3``...) unless one
  is injected, and at most ``max_image_bytes + 1`` bytes are asked for (ranged GET);
- ``https://host/...``, only for hosts in ``config.https_allowed_hosts`` (exact name, any port),
  and only when every address the host resolves to is public. The connection goes to an address
  that was checked (no second DNS look-up to rebind), proxies are not used, redirects are refused,
  and a watchdog ends the whole fetch after ``image_fetch_timeout_s``.

Anything else (``http://``, ``file://``...) is refused. Decoding accepts PNG, JPEG (and MPO),
GIF, WEBP, BMP and TIFF; the declared width x height is checked against ``max_image_pixels``
before any pixel is decoded; only the first frame of an animation is used; EXIF orientation is
applied, as transformers' ``load_image`` does; alpha is composited on white. Error messages
name the host or bucket but never the path, query or image bytes.
"""

from __future__ import annotations

import base64
import hashlib
import binascii
import http.client
import io
import ipaddress
import re
import socket
import ssl
import struct
import threading
import time
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

from llava_sessions.config import ENV_PREFIX, ServingConfig
from llava_sessions.errors import (
    ImageFetchFailed,
    ImageSourceNotAllowed,
    ImageTooLarge,
    InvalidImage,
    SessionsError,
    TooManyImages,
)

# Formats clients send; others (EPS, which runs Ghostscript, and the rarer plugins) widen the
# attack surface for no use here. JPEG includes phones' multi-picture (MPO) files.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

HttpGet = Callable[..., bytes]
S3ClientFactory = Callable[[], Any]

_CHUNK_BYTES = 64 * 1024
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_EXIF_ORIENTATION = 0x0112
_REQUEST_HEADERS = {"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "llava-sessions"}
_ACCEPTED_REFS = (
    "base64, a data:image/...;base64 URL, s3://<allow-listed bucket>/key or https://<allow-listed host>/..."
)


def load_image(
    ref: str,
    config: ServingConfig,
    *,
    s3_client_factory: S3ClientFactory | None = None,
    http_get: HttpGet | None = None,
    allow_loopback_for_tests: bool = False,
) -> Image.Image:
    """Fetch and decode one image reference into an RGB image.

    ``s3_client_factory()`` returns a boto3-like S3 client; it is called only for s3:// refs.
    ``http_get(url, *, timeout_s, max_bytes) -> bytes`` replaces the built-in HTTPS transport
    (and with it the address checks); the scheme and host allow-lists still apply.
    ``allow_loopback_for_tests`` lets the built-in transport reach 127.0.0.1/::1; tests only.
    """
    s3_client_factory = s3_client_factory or _default_s3_factory(config)
    data = _read_bytes(ref, config, s3_client_factory, http_get, allow_loopback_for_tests)
    return decode_image(data, config)


def load_images(
    refs: Sequence[str],
    config: ServingConfig,
    *,
    s3_client_factory: S3ClientFactory | None = None,
    http_get: HttpGet | None = None,
    allow_loopback_for_tests: bool = False,
) -> list[Image.Image]:
    """Load several references in order; one S3 client serves them all."""
    if len(refs) > config.max_images_per_session:
        raise TooManyImages(
            f"{len(refs)} images, at most {config.max_images_per_session} per session; send fewer "
            f"or raise {ENV_PREFIX}MAX_IMAGES_PER_SESSION"
        )
    shared_s3 = _once(s3_client_factory or _default_s3_factory(config))
    return [
        load_image(
            ref,
            config,
            s3_client_factory=shared_s3,
            http_get=http_get,
            allow_loopback_for_tests=allow_loopback_for_tests,
        )
        for ref in refs
    ]


class SourcedImage:
    """An image's bytes, read now, with their digest; decoded only if ``load`` is called.

    A session knows an image it already holds by this digest (the engine's ImageInput), so a
    conversation resent whole does not decode (or, with a digest match, encode) its images again.
    """

    def __init__(self, data: bytes, config: ServingConfig):
        self.digest = hashlib.sha256(data).hexdigest()
        self._data, self._config = data, config
        self._image: Image.Image | None = None

    def load(self) -> Image.Image:
        """The decoded image, decoded once (a turn deferred to a later wave asks again)."""
        if self._image is None:
            self._image = decode_image(self._data, self._config)
        return self._image


def read_images(refs: Sequence[str], config: ServingConfig, *, s3_client_factory: S3ClientFactory | None = None,
                http_get: HttpGet | None = None, allow_loopback_for_tests: bool = False) -> list[SourcedImage]:
    """Read several references' bytes in order (one S3 client serves them all), decoding none."""
    shared_s3 = _once(s3_client_factory or _default_s3_factory(config))
    return [SourcedImage(_read_bytes(ref, config, shared_s3, http_get, allow_loopback_for_tests), config) for ref in refs]


# --- where the bytes come from ---------------------------------------------------


def _read_bytes(
    ref: str,
    config: ServingConfig,
    s3_client_factory: S3ClientFactory,
    http_get: HttpGet | None,
    allow_loopback: bool,
) -> bytes:
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidImage(f"an image reference must be a non-empty string: {_ACCEPTED_REFS}")
    ref = ref.strip()
    # Base64 has no ':', so anything with a scheme is a URL.
    match = _SCHEME_RE.match(ref)
    if match is None:
        return _decode_base64(ref, config, "the base64 image")
    scheme = match.group(1).lower()
    if scheme == "data":
        return _decode_data_url(ref, config)
    if scheme == "s3":
        return _read_s3(ref, config, s3_client_factory)
    if scheme == "https":
        return _read_https(ref, config, http_get, allow_loopback)
    raise ImageSourceNotAllowed(f"{scheme}: image references are not accepted; send {_ACCEPTED_REFS}")


def _decode_base64(text: str, config: ServingConfig, what: str) -> bytes:
    compact = "".join(text.split())  # MIME base64 wraps lines
    # Refuse before allocating: 4 base64 characters carry 3 bytes, less at most 2 of padding.
    if len(compact) // 4 * 3 > config.max_image_bytes + 2:
        raise _too_many_bytes(len(compact) // 4 * 3, config)
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"{what} is not valid base64; send {_ACCEPTED_REFS}") from None


def _decode_data_url(ref: str, config: ServingConfig) -> bytes:
    header, comma, payload = ref[len("data:") :].partition(",")
    media_type, *params = header.split(";")
    if not comma or not media_type.strip().lower().startswith("image/"):
        raise InvalidImage("a data: URL must look like data:image/png;base64,<data>")
    if "base64" not in (p.strip().lower() for p in params):
        raise InvalidImage("only base64 data: URLs are accepted: data:image/png;base64,<data>")
    return _decode_base64(payload, config, "the data: URL's payload")


def _once(factory: S3ClientFactory) -> S3ClientFactory:
    """Call factory at most once, on first use: clients cost tens of ms to make."""
    made: list = []

    def get() -> Any:
        if not made:
            made.append(factory())
        return made[0]

    return get


# --- S3 ----------------------------------------------------------------------------


def _read_s3(ref: str, config: ServingConfig, client_factory: S3ClientFactory) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError  # only S3 users pay for botocore

    bucket, _, key = ref[len("s3://") :].partition("/")
    if not bucket or not key:
        raise InvalidImage("an S3 image reference must look like s3://bucket/key")
    if bucket not in config.s3_allowed_buckets:
        raise ImageSourceNotAllowed(
            f"S3 bucket {bucket!r} is not allow-listed; add it to {ENV_PREFIX}S3_ALLOWED_BUCKETS"
        )
    where = f"s3://{bucket}/…"
    deadline = time.monotonic() + config.image_fetch_timeout_s
    try:
        # One byte past the limit tells "exactly at the limit" from "over it".
        response = client_factory().get_object(
            Bucket=bucket, Key=key, Range=f"bytes=0-{config.max_image_bytes}"
        )
        _check_s3_size(response, config)
        body = response["Body"]
        try:
            return _read_capped(body.read, config, deadline, where)
        finally:
            body.close()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        if code == "InvalidRange":  # S3's answer to a ranged GET of an empty object
            raise InvalidImage(f"the object at {where} is empty") from None
        raise ImageFetchFailed(f"could not read {where}: {code}") from None
    except (BotoCoreError, OSError) as exc:
        raise ImageFetchFailed(f"could not read {where}: {type(exc).__name__}") from None


def _check_s3_size(response: dict, config: ServingConfig) -> None:
    # "bytes 0-N/TOTAL" gives the object's full size; without it the server ignored Range.
    content_range = response.get("ContentRange") or ""
    total = content_range.rpartition("/")[2]
    size = int(total) if total.isdigit() else response.get("ContentLength")
    if size is not None and size > config.max_image_bytes:
        raise _too_many_bytes(size, config)


def _default_s3_factory(config: ServingConfig) -> S3ClientFactory:
    """boto3's S3 client from the standard AWS environment, made only when first needed."""

    def make() -> Any:
        import boto3
        from botocore.config import Config

        timeout = config.image_fetch_timeout_s
        # No retries: each one would add a full timeout to the caller's wait.
        return boto3.client(
            "s3",
            config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1}),
        )

    return make


# --- HTTPS -------------------------------------------------------------------------


def _read_https(ref: str, config: ServingConfig, http_get: HttpGet | None, allow_loopback: bool) -> bytes:
    host, port, target = _allowed_https_target(ref, config)
    if http_get is not None:
        return http_get(ref, timeout_s=config.image_fetch_timeout_s, max_bytes=config.max_image_bytes)
    return _fetch_https(host, port, target, config, allow_loopback)


def _allowed_https_target(ref: str, config: ServingConfig) -> tuple[str, int, str]:
    """(host, port, path-and-query) of an allow-listed https URL."""
    try:
        parts = urlsplit(ref)
        port = parts.port or 443
    except ValueError:
        raise InvalidImage("the https image URL is malformed") from None
    host = parts.hostname or ""
    if parts.username is not None or parts.password is not None:
        raise ImageSourceNotAllowed("https image URLs with user:password@ are not accepted")
    if host not in {allowed.lower() for allowed in config.https_allowed_hosts}:
        raise ImageSourceNotAllowed(
            f"image host {host!r} is not allow-listed; add it to {ENV_PREFIX}HTTPS_ALLOWED_HOSTS "
            f"or send the image as base64"
        )
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, port, target


def _fetch_https(host: str, port: int, target: str, config: ServingConfig, allow_loopback: bool) -> bytes:
    deadline = time.monotonic() + config.image_fetch_timeout_s
    where = f"https://{host}/…"
    addresses = _resolve_public(host, port, deadline, allow_loopback)
    conn = _PinnedHTTPSConnection(host, port, addresses, deadline)
    # Socket timeouts bound each wait, not their sum; the watchdog bounds the whole fetch.
    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), conn.abort)
    watchdog.daemon = True
    watchdog.start()
    response = None
    try:
        conn.request("GET", target, headers=_REQUEST_HEADERS)
        response = conn.getresponse()
        _check_http_response(response, config, where)
        data = _read_capped(response.read1, config, deadline, where)
        incomplete = bool(response.length)  # bytes still owed by Content-Length
    except (OSError, http.client.HTTPException) as exc:
        if conn.aborted or isinstance(exc, TimeoutError):
            raise _timed_out(where, config) from None
        raise ImageFetchFailed(f"could not fetch {where}: {type(exc).__name__}") from None
    finally:
        watchdog.cancel()
        # The response owns the socket's file once the server said "Connection: close".
        if response is not None:
            response.close()
        conn.close()
    # An abort can look like a clean end of file to the reader.
    if conn.aborted:
        raise _timed_out(where, config)
    if incomplete:
        raise ImageFetchFailed(f"{where} closed the connection before the whole image arrived")
    return data


def _resolve_public(host: str, port: int, deadline: float, allow_loopback: bool) -> list[tuple]:
    """Every address of host, refused unless all are public (no pivot into the VPC or metadata)."""
    try:
        infos = _within_deadline(lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), deadline)
    except OSError:
        raise ImageFetchFailed(f"could not resolve image host {host!r}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not (_is_public(address) or (allow_loopback and address.is_loopback)):
            raise ImageSourceNotAllowed(
                f"image host {host!r} resolves to a non-public address; only public addresses are fetched"
            )
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # ::ffff:10.0.0.1 reaches 10.0.0.1; judge the IPv4 address it maps to.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # is_global excludes private, loopback, link-local, reserved, shared and documentation ranges.
    return address.is_global and not address.is_multicast


def _within_deadline(call: Callable[[], Any], deadline: float) -> Any:
    """Run a call that has no timeout of its own (DNS) on a daemon thread, and stop waiting at deadline."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(max(deadline - time.monotonic(), 0.0))
    if "error" in outcome:
        raise outcome["error"]
    if "value" not in outcome:
        raise TimeoutError("timed out")
    return outcome["value"]


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Connects only to addresses checked beforehand, verifying TLS for the host name."""

    def __init__(self, host: str, port: int, addresses: list[tuple], deadline: float):
        # A fresh default context honours SSL_CERT_FILE / SSL_CERT_DIR at call time.
        super().__init__(
            host, port, timeout=max(deadline - time.monotonic(), 0.001), context=ssl.create_default_context()
        )
        self._addresses = addresses
        self._deadline = deadline
        self.aborted = False

    def connect(self) -> None:
        last_error: OSError = TimeoutError("timed out")
        for family, sockaddr in self._addresses:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0 or self.aborted:
                break
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.settimeout(remaining)
            try:
                self.sock.connect(sockaddr)
            except OSError as exc:
                self.sock.close()
                last_error = exc
                continue
            self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)
            return
        raise last_error

    def abort(self) -> None:
        """Unblock any read in progress, from the watchdog thread."""
        self.aborted = True
        sock = self.sock
        if sock is not None:
            try:
                # The plain socket's shutdown: SSLSocket.shutdown would race the reader's TLS state.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


def _check_http_response(response: http.client.HTTPResponse, config: ServingConfig, where: str) -> None:
    if 300 <= response.status < 400:
        raise ImageSourceNotAllowed(
            f"{where} answered with a redirect (HTTP {response.status}); "
            "redirects are not followed, send the final URL"
        )
    if response.status != 200:
        raise ImageFetchFailed(f"{where} answered HTTP {response.status}")
    declared = response.getheader("Content-Length", "")
    if declared.isdigit() and int(declared) > config.max_image_bytes:
        raise _too_many_bytes(int(declared), config)


def _read_capped(read: Callable[[int], bytes], config: ServingConfig, deadline: float, where: str) -> bytes:
    """Read to EOF, failing as soon as the limit is passed or the deadline is."""
    chunks, total = [], 0
    while chunk := read(_CHUNK_BYTES):
        total += len(chunk)
        if total > config.max_image_bytes:
            raise _too_many_bytes(total, config, at_least=True)
        if time.monotonic() > deadline:
            raise _timed_out(where, config)
        chunks.append(chunk)
    return b"".join(chunks)


# --- decoding ----------------------------------------------------------------------


def decode_image(data: bytes, config: ServingConfig) -> Image.Image:
    """Encoded bytes to an RGB image, checking size and declared pixels before decoding."""
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    if len(data) > config.max_image_bytes:
        raise _too_many_bytes(len(data), config)
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            _check_pixels(image.size, config)
            image.load()  # the current frame only: the first of an animation
            return _to_rgb(image)
    except SessionsError:
        raise
    except Image.DecompressionBombError:  # Pillow's own outer bound, past ours
        raise ImageTooLarge(
            f"the image declares more than {config.max_image_pixels} pixels; send a smaller image"
        ) from None
    except UnidentifiedImageError:
        raise InvalidImage(
            f"the data is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error):
        raise InvalidImage("the image data is truncated or corrupt; send the complete file") from None


def _check_pixels(size: tuple[int, int], config: ServingConfig) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the image declares a size of {width}x{height}; it has no pixels")
    if width * height > config.max_image_pixels:
        raise ImageTooLarge(
            f"the image declares {width}x{height} = {width * height} pixels, over the limit of "
            f"{config.max_image_pixels}; send a smaller image or raise {ENV_PREFIX}MAX_IMAGE_PIXELS"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    image = _upright(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight_bit(image)
    if _has_alpha(image):
        return _flatten_on_white(image)
    return image.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, so the model sees what a viewer shows."""
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return image
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, struct.error, KeyError, TypeError):
        return image  # unreadable EXIF: keep the pixels as stored


def _sixteen_to_eight_bit(image: Image.Image) -> Image.Image:
    # A plain convert("L") clips every value above 255 to white; scale 0..65535 down instead.
    return image.convert("I").point(lambda value: value * (1 / 256)).convert("L")


def _has_alpha(image: Image.Image) -> bool:
    # Image.has_transparency_data needs Pillow 10.1; setup.cfg allows 10.0.
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def _flatten_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _timed_out(where: str, config: ServingConfig) -> ImageFetchFailed:
    return ImageFetchFailed(f"{where} did not deliver the image within {config.image_fetch_timeout_s:g} s")


def _too_many_bytes(size: int, config: ServingConfig, at_least: bool = False) -> ImageTooLarge:
    amount = f"more than {config.max_image_bytes}" if at_least else str(size)
    return ImageTooLarge(
        f"the image is {amount} bytes, over the limit of {config.max_image_bytes}; send a smaller "
        f"image or raise {ENV_PREFIX}MAX_IMAGE_BYTES"
    )
