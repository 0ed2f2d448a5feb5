"""Unit tests for llava_sessions.handler.image_sources.

No test reaches beyond 127.0.0.1: HTTPS cases use a local TLS server with a throw-away
certificate (trusted through SSL_CERT_FILE), DNS answers are faked, S3 is a fake client or moto.
"""

from __future__ import annotations

import http.server
import io
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest
from PIL import Image

from llava_sessions.config import ServingConfig
from llava_sessions.errors import SessionsError
from llava_sessions.handler.image_sources import decode_image, load_image, load_images
from tests.fakes import b64, encode, isolate_from_aws, local_http_server, png_declaring

CONFIG = ServingConfig()
SERVER_LOOP_LIMIT_S = 3.0  # no handler of the local server runs longer than this


RED_PNG = encode(Image.new("RGB", (8, 6), (255, 0, 0)))


def code_of(call) -> str:
    with pytest.raises(SessionsError) as info:
        call()
    return info.value.code


def load_error(ref, config=CONFIG, **kwargs) -> SessionsError:
    with pytest.raises(SessionsError) as info:
        load_image(ref, config, **kwargs)
    return info.value


# --- inline sources ----------------------------------------------------------------------


def test_plain_base64_png():
    image = load_image(b64(RED_PNG), CONFIG)
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (8, 6), (255, 0, 0))


@pytest.mark.parametrize(
    "ref",
    [
        "\n".join(b64(RED_PNG)[i : i + 76] for i in range(0, len(b64(RED_PNG)), 76)),  # MIME line breaks
        b64(RED_PNG).rstrip("="),  # padding left out
        f"  {b64(RED_PNG)}  ",
        f"data:image/png;base64,{b64(RED_PNG)}",
        f"DATA:image/jpeg;name=x.png;base64,{b64(RED_PNG)}",  # media type is a label; the bytes decide
    ],
)
def test_base64_variants(ref):
    assert load_image(ref, CONFIG).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    "ref",
    [
        "not base64 at all!",
        "data:text/plain;base64," + b64(RED_PNG),
        "data:image/png," + b64(RED_PNG),
        "data:image/png;base64",
        "data:image/png;base64,@@@@",
        b64(b"just some text, not an image"),
        b64(encode(Image.new("RGB", (4, 4)), "PPM")),  # a Pillow format outside the allow-list
        b64(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),  # EPS would run Ghostscript
        b64(RED_PNG[: len(RED_PNG) // 2]),  # truncated
        "",
        "   ",
    ],
)
def test_bad_inline_images_are_invalid(ref):
    assert load_error(ref).code == "INVALID_IMAGE"


@pytest.mark.parametrize("ref", [None, 12, b"aGk="])
def test_non_string_reference_is_invalid(ref):
    assert load_error(ref).code == "INVALID_IMAGE"


@pytest.mark.parametrize(
    "ref",
    [
        "http://images.example.com/cat.png",
        "HTTP://images.example.com/cat.png",
        "ftp://images.example.com/cat.png",
        "file:///etc/passwd",
        "gs://bucket/cat.png",
    ],
)
def test_other_schemes_are_refused_even_for_allowed_hosts(ref):
    config = CONFIG.replace(https_allowed_hosts=("images.example.com",))
    assert load_error(ref, config, http_get=fail_if_called).code == "IMAGE_SOURCE_NOT_ALLOWED"


# --- decoding limits ---------------------------------------------------------------------


def test_byte_limit_is_inclusive():
    assert decode_image(RED_PNG, CONFIG.replace(max_image_bytes=len(RED_PNG))).size == (8, 6)
    assert (
        code_of(lambda: decode_image(RED_PNG, CONFIG.replace(max_image_bytes=len(RED_PNG) - 1)))
        == "IMAGE_TOO_LARGE"
    )


def test_oversized_base64_is_refused_before_decoding():
    config = CONFIG.replace(max_image_bytes=1000)
    assert load_error("A" * 10_000, config).code == "IMAGE_TOO_LARGE"


def test_empty_bytes_are_invalid():
    assert code_of(lambda: decode_image(b"", CONFIG)) == "INVALID_IMAGE"


def test_pixel_limit_is_inclusive_and_ours_not_pillows():
    data = encode(Image.new("RGB", (100, 100)))
    assert decode_image(data, CONFIG.replace(max_image_pixels=10_000)).size == (100, 100)
    assert code_of(lambda: decode_image(data, CONFIG.replace(max_image_pixels=9_999))) == "IMAGE_TOO_LARGE"


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    header_only = png_declaring(5000, 5000)
    # Under the limit the missing pixel data shows up as a truncated file...
    assert code_of(lambda: decode_image(header_only, CONFIG)) == "INVALID_IMAGE"
    # ...over it the image is refused without trying to decode anything.
    assert (
        code_of(lambda: decode_image(header_only, CONFIG.replace(max_image_pixels=1_000_000)))
        == "IMAGE_TOO_LARGE"
    )


def test_decompression_bomb_header():
    before = Image.MAX_IMAGE_PIXELS
    assert code_of(lambda: decode_image(png_declaring(100_000, 100_000), CONFIG)) == "IMAGE_TOO_LARGE"
    assert Image.MAX_IMAGE_PIXELS == before  # no global was touched


def test_zero_sized_image_is_invalid():
    assert code_of(lambda: decode_image(png_declaring(0, 10), CONFIG)) == "INVALID_IMAGE"


def test_corrupt_png_crc_is_invalid():
    data = bytearray(encode(Image.effect_noise((32, 32), 50)))
    data[-20] ^= 0xFF  # inside the last IDAT chunk
    assert code_of(lambda: decode_image(bytes(data), CONFIG)) == "INVALID_IMAGE"


# --- modes and frames ---------------------------------------------------------------------


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (10, 10), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    image = decode_image(data, CONFIG)
    assert (image.mode, image.size, image.getpixel((5, 5))) == ("RGB", (10, 10), (255, 0, 0))


def test_animated_webp_gives_the_first_frame():
    frames = [Image.new("RGB", (10, 10), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert decode_image(data, CONFIG).getpixel((5, 5)) == (255, 0, 0)


def test_cmyk_jpeg():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    image = decode_image(data, CONFIG)
    red, green, blue = image.getpixel((8, 8))
    assert image.mode == "RGB" and red > 230 and green < 30 and blue < 30


def test_sixteen_bit_grey_png_is_scaled_not_clipped():
    data = encode(Image.new("I;16", (4, 4), 40_000))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = decode_image(data, CONFIG)
    assert (image.mode, image.getpixel((0, 0))) == ("RGB", (156, 156, 156))  # 40000 / 256


@pytest.mark.parametrize(
    "mode, color, expected",
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent: white
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (0, 255), (0, 0, 0)),
    ],
)
def test_alpha_is_composited_on_white(mode, color, expected):
    image = decode_image(encode(Image.new(mode, (4, 4), color)), CONFIG)
    assert image.mode == "RGB"
    assert all(abs(a - b) <= 1 for a, b in zip(image.getpixel((1, 1)), expected))


def test_palette_with_transparent_index():
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_image.putpixel((0, 0), 0)
    image = decode_image(encode(palette_image, transparency=0), CONFIG)
    assert (image.getpixel((0, 0)), image.getpixel((1, 1))) == ((255, 255, 255), (255, 0, 0))


@pytest.mark.parametrize(
    "mode, fmt, color",
    [
        ("P", "PNG", 0),
        ("L", "PNG", 200),
        ("1", "PNG", 1),
        ("RGB", "JPEG", (10, 200, 30)),
        ("RGB", "BMP", (10, 200, 30)),
        ("RGB", "TIFF", (10, 200, 30)),
        ("RGB", "WEBP", (10, 200, 30)),
        ("L", "JPEG", 100),
    ],
)
def test_other_modes_and_formats_become_rgb(mode, fmt, color):
    image = decode_image(encode(Image.new(mode, (8, 8), color), fmt), CONFIG)
    assert (image.mode, image.size) == ("RGB", (8, 8))


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.new("RGB", (20, 10), (0, 0, 255)), "JPEG", exif=exif.tobytes())
    assert decode_image(data, CONFIG).size == (10, 20)


# --- S3 --------------------------------------------------------------------------------------


class FakeBody:
    def __init__(self, data: bytes):
        self._stream = io.BytesIO(data)
        self.closed = False

    def read(self, amount: int = -1) -> bytes:
        return self._stream.read(amount)

    def close(self) -> None:
        self.closed = True


class FakeS3:
    """Answers get_object like S3: ranged reads, NoSuchKey, InvalidRange on empty objects."""

    def __init__(self, objects: dict, honour_range: bool = True, declare_length: bool = True):
        self.objects = objects
        self.honour_range = honour_range
        self.declare_length = declare_length
        self.calls: list[dict] = []
        self.bodies: list[FakeBody] = []

    def get_object(self, **kwargs):
        from botocore.exceptions import ClientError

        self.calls.append(kwargs)
        key = (kwargs["Bucket"], kwargs["Key"])
        if key not in self.objects:
            raise ClientError({"Error": {"Code": "NoSuchKey", "Message": "x"}}, "GetObject")
        data = self.objects[key]
        response = {}
        if self.honour_range:
            if not data:
                raise ClientError({"Error": {"Code": "InvalidRange", "Message": "x"}}, "GetObject")
            last = int(kwargs["Range"].split("-")[1])
            response["ContentRange"] = f"bytes 0-{min(last, len(data) - 1)}/{len(data)}"
            data = data[: last + 1]
        if self.declare_length:
            response["ContentLength"] = len(data)
        response["Body"] = FakeBody(data)
        self.bodies.append(response["Body"])
        return response


S3_CONFIG = CONFIG.replace(s3_allowed_buckets=("img-bucket",))


def test_s3_allowed_bucket():
    fake = FakeS3({("img-bucket", "cats/red.png"): RED_PNG})
    image = load_image("s3://img-bucket/cats/red.png", S3_CONFIG, s3_client_factory=lambda: fake)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert fake.calls == [
        {"Bucket": "img-bucket", "Key": "cats/red.png", "Range": f"bytes=0-{S3_CONFIG.max_image_bytes}"}
    ]
    assert fake.bodies[0].closed


def test_s3_bucket_not_allowed_never_makes_a_client():
    def factory():
        raise AssertionError("client made for a refused bucket")

    error = load_error("s3://other-bucket/secret/key.png", S3_CONFIG, s3_client_factory=factory)
    assert error.code == "IMAGE_SOURCE_NOT_ALLOWED" and "secret" not in error.message


@pytest.mark.parametrize("ref", ["s3://img-bucket", "s3://img-bucket/", "s3:///key.png"])
def test_malformed_s3_reference(ref):
    assert load_error(ref, S3_CONFIG, s3_client_factory=lambda: FakeS3({})).code == "INVALID_IMAGE"


@pytest.mark.parametrize(
    "fake",
    [
        FakeS3({("img-bucket", "big"): b"x" * 5000}),  # total size from Content-Range
        FakeS3({("img-bucket", "big"): b"x" * 5000}, honour_range=False),  # Content-Length
        FakeS3({("img-bucket", "big"): b"x" * 5000}, honour_range=False, declare_length=False),  # read cap
    ],
)
def test_s3_object_over_the_byte_limit(fake):
    config = S3_CONFIG.replace(max_image_bytes=1000)
    assert load_error("s3://img-bucket/big", config, s3_client_factory=lambda: fake).code == "IMAGE_TOO_LARGE"


def test_s3_errors():
    fake = FakeS3({("img-bucket", "empty"): b""})
    assert (
        load_error("s3://img-bucket/empty", S3_CONFIG, s3_client_factory=lambda: fake).code == "INVALID_IMAGE"
    )
    error = load_error("s3://img-bucket/private/missing.png", S3_CONFIG, s3_client_factory=lambda: fake)
    assert (
        error.code == "IMAGE_FETCH_FAILED" and "NoSuchKey" in error.message and "private" not in error.message
    )


def test_s3_transport_error():
    from botocore.exceptions import EndpointConnectionError

    class Unreachable:
        def get_object(self, **kwargs):
            raise EndpointConnectionError(endpoint_url="https://s3.example")

    error = load_error("s3://img-bucket/a.png", S3_CONFIG, s3_client_factory=Unreachable)
    assert error.code == "IMAGE_FETCH_FAILED"


def test_load_images_makes_one_s3_client_and_only_when_needed():
    fake = FakeS3({("img-bucket", "a"): RED_PNG, ("img-bucket", "b"): RED_PNG})
    made = []

    def factory():
        made.append(1)
        return fake

    assert load_images([b64(RED_PNG)], S3_CONFIG, s3_client_factory=factory)[0].size == (8, 6)
    assert made == []
    images = load_images(
        ["s3://img-bucket/a", b64(RED_PNG), "s3://img-bucket/b"], S3_CONFIG, s3_client_factory=factory
    )
    assert [image.size for image in images] == [(8, 6)] * 3 and made == [1]


def test_load_images_count_limit():
    config = CONFIG.replace(max_images_per_session=2)
    assert code_of(lambda: load_images([b64(RED_PNG)] * 3, config)) == "TOO_MANY_IMAGES"


@pytest.fixture
def moto_s3(monkeypatch):
    moto = pytest.importorskip("moto", reason="moto not installed")
    isolate_from_aws(monkeypatch)
    with moto.mock_aws():
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="img-bucket")
        client.put_object(Bucket="img-bucket", Key="red.png", Body=RED_PNG)
        client.put_object(Bucket="img-bucket", Key="empty.png", Body=b"")
        client.put_object(Bucket="img-bucket", Key="big.bin", Body=b"x" * 5000)
        yield client


def test_s3_with_moto_and_the_default_client(moto_s3):
    # No factory: boto3's own client, configured from the standard AWS environment.
    assert load_image("s3://img-bucket/red.png", S3_CONFIG).getpixel((0, 0)) == (255, 0, 0)
    config = S3_CONFIG.replace(max_image_bytes=1000)
    assert load_error("s3://img-bucket/big.bin", config).code == "IMAGE_TOO_LARGE"
    assert load_error("s3://img-bucket/empty.png", S3_CONFIG).code == "INVALID_IMAGE"
    assert load_error("s3://img-bucket/missing.png", S3_CONFIG).code == "IMAGE_FETCH_FAILED"


def test_s3_with_moto_and_an_injected_client(moto_s3):
    images = load_images(["s3://img-bucket/red.png"] * 2, S3_CONFIG, s3_client_factory=lambda: moto_s3)
    assert [image.getpixel((0, 0)) for image in images] == [(255, 0, 0)] * 2


# --- HTTPS: allow-lists and addresses (no connection is made) -------------------------------


def fail_if_called(url, **kwargs):
    raise AssertionError(f"fetched {url}")


HTTPS_CONFIG = CONFIG.replace(https_allowed_hosts=("images.example.com",))


def test_https_allowed_host_through_an_injected_transport():
    calls = []

    def http_get(url, *, timeout_s, max_bytes):
        calls.append((url, timeout_s, max_bytes))
        return RED_PNG

    image = load_image("https://IMAGES.example.com/cat.png?size=large", HTTPS_CONFIG, http_get=http_get)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert calls == [
        (
            "https://IMAGES.example.com/cat.png?size=large",
            HTTPS_CONFIG.image_fetch_timeout_s,
            HTTPS_CONFIG.max_image_bytes,
        )
    ]


def test_injected_transport_result_is_still_size_checked():
    config = HTTPS_CONFIG.replace(max_image_bytes=len(RED_PNG) - 1)
    assert (
        load_error("https://images.example.com/a.png", config, http_get=lambda url, **kw: RED_PNG).code
        == "IMAGE_TOO_LARGE"
    )


@pytest.mark.parametrize(
    "ref",
    [
        "https://evil.example.org/cat.png",
        "https://images.example.com.evil.org/cat.png",
        "https://sub.images.example.com/cat.png",
        "https://example.com/cat.png",
        "https://images.example.com@evil.org/cat.png",
        "https://user:password@images.example.com/cat.png",
        "https://images.example.com./cat.png",
    ],
)
def test_https_hosts_must_match_exactly(ref):
    assert load_error(ref, HTTPS_CONFIG, http_get=fail_if_called).code == "IMAGE_SOURCE_NOT_ALLOWED"


def test_errors_do_not_leak_paths_or_query_strings():
    ref = "https://evil.example.org/private/cat.png?X-Amz-Signature=SECRET123"
    error = load_error(ref, HTTPS_CONFIG, http_get=fail_if_called)
    assert (
        "SECRET123" not in error.message
        and "private" not in error.message
        and "evil.example.org" in error.message
    )


def test_malformed_https_url():
    assert load_error("https://images.example.com:99999/a.png", HTTPS_CONFIG).code == "INVALID_IMAGE"


@pytest.fixture
def fake_dns(monkeypatch):
    """Make images.example.com resolve to the given addresses, without any network."""

    def install(*addresses: str):
        def getaddrinfo(host, port, *args, **kwargs):
            assert host == "images.example.com"
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in addresses
            ]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    return install


@pytest.mark.parametrize(
    "addresses",
    [
        ("127.0.0.1",),
        ("10.1.2.3",),
        ("172.16.0.9",),
        ("192.168.1.1",),
        ("169.254.169.254",),  # instance metadata
        ("100.64.0.1",),  # carrier-grade NAT
        ("0.0.0.0",),
        ("224.0.0.1",),
        ("240.0.0.1",),
        ("::1",),
        ("fe80::1",),
        ("fc00::1",),
        ("::ffff:127.0.0.1",),
        ("::ffff:10.0.0.1",),
        ("93.184.216.34", "10.0.0.1"),  # one private answer among public ones is enough
    ],
)
def test_non_public_addresses_are_refused(fake_dns, addresses):
    fake_dns(*addresses)
    assert load_error("https://images.example.com/a.png", HTTPS_CONFIG).code == "IMAGE_SOURCE_NOT_ALLOWED"


def test_loopback_override_allows_only_loopback(fake_dns):
    fake_dns("127.0.0.1", "10.0.0.1")
    error = load_error("https://images.example.com/a.png", HTTPS_CONFIG, allow_loopback_for_tests=True)
    assert error.code == "IMAGE_SOURCE_NOT_ALLOWED"


def test_localhost_is_refused_even_when_allow_listed():
    config = CONFIG.replace(https_allowed_hosts=("localhost", "127.0.0.1"))
    assert load_error("https://localhost/a.png", config).code == "IMAGE_SOURCE_NOT_ALLOWED"
    assert load_error("https://127.0.0.1/a.png", config).code == "IMAGE_SOURCE_NOT_ALLOWED"


# --- HTTPS against a local TLS server ---------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes by path; every loop ends at SERVER_LOOP_LIMIT_S or when the server stops."""

    stop: threading.Event

    def log_message(self, *args):
        pass

    def do_GET(self):
        route = getattr(
            self, "route_" + self.path.split("?")[0].strip("/").replace("-", "_").replace(".", "_"), None
        )
        if route is None:
            self.send_error(404)
            return
        try:
            route()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            pass  # the client gave up, as it should

    def route_ok_png(self):
        self._headers(200, {"Content-Type": "image/png", "Content-Length": str(len(RED_PNG))})
        self.wfile.write(RED_PNG)

    def route_redirect(self):
        self._headers(
            302, {"Location": f"https://127.0.0.1:{self.server.server_port}/ok.png", "Content-Length": "0"}
        )

    def route_huge_declared(self):
        self._headers(200, {"Content-Length": str(10**9)})
        self.wfile.write(b"x" * 1024)

    def route_endless(self):
        self._headers(200, {})
        self._loop(lambda: self.wfile.write(b"x" * 65536), pause=0.0)

    def route_slow(self):
        self._headers(200, {"Content-Length": "1000"})
        self._loop(lambda: (self.wfile.write(b"x"), self.wfile.flush()), pause=0.05)

    def route_slow_headers(self):
        self.wfile.write(b"HTTP/1.0 200 OK\r\n")
        self._loop(lambda: (self.wfile.write(b"X-Padding: 1\r\n"), self.wfile.flush()), pause=0.05)

    def route_short(self):
        self._headers(200, {"Content-Length": "1000"})
        self.wfile.write(b"x" * 10)

    def route_stall(self):
        self.stop.wait(SERVER_LOOP_LIMIT_S)

    def _headers(self, status, headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _loop(self, step, pause):
        ends = time.monotonic() + SERVER_LOOP_LIMIT_S
        while time.monotonic() < ends and not self.stop.is_set():
            step()
            if pause:
                time.sleep(pause)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a throw-away self-signed certificate for that address."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    stop = threading.Event()
    handler = type("Handler", (_Handler,), {"stop": stop})

    def prepare(server):
        server.handle_error = lambda request, address: None  # failed handshakes are expected here
        server.socket = context.wrap_socket(server.socket, server_side=True)

    with local_http_server(handler, prepare) as server:
        try:
            yield f"https://127.0.0.1:{server.server_port}", cert
        finally:
            stop.set()  # before the server stops: handlers waiting on it return


@pytest.fixture
def local_https(tls_server, monkeypatch):
    base, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    return base


LOCAL_CONFIG = CONFIG.replace(https_allowed_hosts=("127.0.0.1",), image_fetch_timeout_s=2.0)


def fetch_local(url, config=LOCAL_CONFIG):
    return load_image(url, config, allow_loopback_for_tests=True)


def test_local_https_image(local_https):
    assert fetch_local(f"{local_https}/ok.png?v=1").getpixel((0, 0)) == (255, 0, 0)


def test_loopback_server_is_refused_without_the_override(local_https):
    assert load_error(f"{local_https}/ok.png", LOCAL_CONFIG).code == "IMAGE_SOURCE_NOT_ALLOWED"


def test_untrusted_certificate_is_refused(tls_server, monkeypatch, tmp_path):
    base, _ = tls_server
    empty_bundle = tmp_path / "none.pem"
    empty_bundle.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(empty_bundle))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    assert code_of(lambda: fetch_local(f"{base}/ok.png")) == "IMAGE_FETCH_FAILED"


def test_redirects_are_not_followed(local_https):
    assert code_of(lambda: fetch_local(f"{local_https}/redirect")) == "IMAGE_SOURCE_NOT_ALLOWED"


def test_http_error_status(local_https):
    error = load_error(f"{local_https}/missing?token=SECRET123", LOCAL_CONFIG, allow_loopback_for_tests=True)
    assert error.code == "IMAGE_FETCH_FAILED" and "404" in error.message
    assert "SECRET123" not in error.message and "missing" not in error.message


@pytest.mark.parametrize("path", ["huge-declared", "endless"])
def test_body_over_the_byte_limit(local_https, path):
    config = LOCAL_CONFIG.replace(max_image_bytes=100_000)
    started = time.monotonic()
    assert code_of(lambda: fetch_local(f"{local_https}/{path}", config)) == "IMAGE_TOO_LARGE"
    assert time.monotonic() - started < config.image_fetch_timeout_s


@pytest.mark.parametrize("path", ["slow", "slow-headers", "stall"])
def test_slow_server_ends_within_the_timeout(local_https, path):
    # "slow-headers" sends a header line every 50 ms: no single wait times out, only the total does.
    config = LOCAL_CONFIG.replace(image_fetch_timeout_s=0.5)
    started = time.monotonic()
    error = load_error(f"{local_https}/{path}", config, allow_loopback_for_tests=True)
    elapsed = time.monotonic() - started
    assert error.code == "IMAGE_FETCH_FAILED" and "within 0.5 s" in error.message
    assert 0.4 < elapsed < 1.0


def test_body_cut_short(local_https):
    error = load_error(f"{local_https}/short", LOCAL_CONFIG, allow_loopback_for_tests=True)
    assert error.code == "IMAGE_FETCH_FAILED" and "before the whole image" in error.message
