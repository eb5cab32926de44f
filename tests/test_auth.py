"""Tests of API keys and CORS (service.auth, service.app.asgi_middlewares): key files, the constant-time check, the
CLI, the app behind the middleware in this process, then the real server (its log, its start-up refusal)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from starlette.testclient import TestClient

from benchmarks.servers import BentoServer, free_port
from inference.imaging import encode_png
from service import auth
from service.app import JsonErrors, asgi_middlewares, attach, create_app, with_middlewares
from service.auth import AccessControl, hash_key, read_key_hashes
from service.classifier import Classifier
from service.errors import ApiError
from service.settings import ServiceSettings, SettingsError
from tests.support.color_package import color_pixels, make_color_package
from tests.support.servers import REPO, SERVICE

KEY = "vs-test-key-7f3a9c1e"  # a key that the tests look for in the server's log
OTHER_KEY = "vs-wrong-key-0b8d2e44"
PNG = encode_png(color_pixels("red")[0])


def key_file(path, *keys: str, extra: str = "") -> str:
    path.write_text("# the service's API keys\n\n" + "".join(hash_key(k) + "\n" for k in keys) + extra)
    return str(path)


# --- key files, the check and the CLI -----------------------------------------------------------------------------


def test_a_key_file_holds_hashes_comments_and_blank_lines(tmp_path):
    path = key_file(tmp_path / "keys", KEY, "second")
    digests = read_key_hashes(path, "VISIONSERVE_API_KEYS_FILE")
    assert len(digests) == 2 and all(len(d) == 32 for d in digests)
    assert auth.matches_any(KEY, digests) and auth.matches_any("second", digests)
    assert not auth.matches_any(OTHER_KEY, digests)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the key file (No such file or directory)"),
        (f"sha256:{'ab' * 32}\n{KEY}\n", "line 2 is not a `sha256:<64 hex digits>` hash"),
        ("# nothing but comments\n\n", "the key file holds no keys"),
        (b"\xff\xfe", "cannot read the key file (UnicodeDecodeError)"),
    ],
)
def test_a_bad_key_file_is_a_settings_error_that_never_shows_a_key(tmp_path, content, message):
    path = tmp_path / "keys"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SettingsError) as refused:
        read_key_hashes(str(path), "VISIONSERVE_API_KEYS_FILE")
    assert str(refused.value).startswith(f"VISIONSERVE_API_KEYS_FILE={path}: ")
    assert message in str(refused.value) and KEY not in str(refused.value)


def test_every_stored_hash_is_compared_in_constant_time(monkeypatch):
    calls = []

    def compare_digest(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", compare_digest)
    digests = tuple(bytes.fromhex(hash_key(k).removeprefix("sha256:")) for k in ("a", KEY, "c"))
    assert auth.matches_any(KEY, digests)
    assert [b for _, b in calls] == list(digests)  # no early exit on the match: the time does not tell which
    calls.clear()
    assert not auth.matches_any(OTHER_KEY, digests)
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None), ("", None), (None, None)],
)
def test_the_bearer_token_is_read_from_the_header(header, token):
    assert auth.bearer_token(header) == token


def test_the_cli_hashes_a_key_from_stdin():
    done = subprocess.run(
        [sys.executable, "-m", "service.auth", "hash"], input=KEY + "\n", capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == hash_key(KEY) + "\n"
    assert done.stdout.startswith("sha256:") and KEY not in done.stdout


def test_check_authorization_uses_the_environments_key_file(tmp_path, monkeypatch):
    # What a gRPC server beside the HTTP routes calls with its `authorization` metadata.
    monkeypatch.setenv("VISIONSERVE_API_KEYS_FILE", key_file(tmp_path / "keys", KEY))
    auth.configured.cache_clear()
    try:
        auth.check_authorization(f"Bearer {KEY}")
        for header in (None, f"Bearer {OTHER_KEY}", KEY):
            with pytest.raises(ApiError) as refused:
                auth.check_authorization(header)
            assert (refused.value.status, refused.value.code) == (401, "unauthorized")
            assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
        with pytest.raises(ApiError, match="ADMIN_KEYS_FILE is not set"):  # admin routes are off without keys
            auth.check_admin_authorization(f"Bearer {KEY}")
    finally:
        auth.configured.cache_clear()


def test_admin_keys_are_their_own(tmp_path):
    access = AccessControl.from_settings(
        ServiceSettings(api_keys_file=key_file(tmp_path / "keys", KEY), admin_keys_file=key_file(tmp_path / "a", "adm"))
    )
    access.check_admin("Bearer adm")
    with pytest.raises(ApiError):
        access.check_admin(f"Bearer {KEY}")
    with pytest.raises(ApiError):
        access.check("Bearer adm")


def test_without_keys_nothing_needs_one():
    access = AccessControl.from_settings(ServiceSettings())
    assert not access.enabled and not access.requires_key("/classify")
    access.check(None)
    # No key check and no CORS when nothing is set: only the JSON rewriting of non-JSON errors.
    assert asgi_middlewares(ServiceSettings(), access) == [(JsonErrors, {})]


def test_cors_origins_must_be_origins():
    assert ServiceSettings(cors_origins="https://a.example, http://localhost:8080/").cors_origin_list == [
        "https://a.example",
        "http://localhost:8080",
    ]
    for bad in ("a.example", "https://a.example/app", "ftp://a.example"):
        with pytest.raises(SettingsError, match="VISIONSERVE_CORS_ORIGINS"):
            ServiceSettings(cors_origins=bad)


# --- the app behind the middleware, in this process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    package = make_color_package(tmp_path_factory.mktemp("auth") / "color")
    return Classifier(ServiceSettings(model=str(package), device="cpu"))


def client_for(classifier, tmp_path, **settings) -> TestClient:
    """A TestClient of the service's app inside the middleware that `settings` ask for, as BentoML stacks it."""
    settings = ServiceSettings(model=classifier.settings.model, device="cpu", **settings)
    app = create_app()
    attach(app, classifier)
    return TestClient(with_middlewares(app, asgi_middlewares(settings, AccessControl.from_settings(settings))))


@pytest.fixture
def keyed(classifier, tmp_path):
    with client_for(classifier, tmp_path, api_keys_file=key_file(tmp_path / "keys", KEY)) as client:
        client.portal.call(classifier.start)
        yield client
        client.portal.call(classifier.stop)


def assert_unauthorized(response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "unauthorized" and response.json()["error"]
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/classify"),
        ("POST", "/classify_batch"),
        ("GET", "/metadata"),
        ("GET", "/v2"),
        ("GET", "/v2/models/color"),
        ("POST", "/v2/models/color/infer"),
        ("GET", "/v2/models/color/config"),
        ("GET", "/v2/models/color/stats"),
        ("GET", "/no/such/route"),  # no key, no hint of which paths exist
    ],
)
def test_prediction_and_metadata_routes_want_a_key(keyed, method, path):
    assert_unauthorized(keyed.request(method, path))
    assert_unauthorized(keyed.request(method, path, headers={"Authorization": f"Bearer {OTHER_KEY}"}))
    assert_unauthorized(keyed.request(method, path, headers={"Authorization": f"Basic {KEY}"}))


def test_the_right_key_gets_the_answer(keyed):
    headers = {"Authorization": f"Bearer {KEY}"}
    response = keyed.post("/classify", content=PNG, headers={**headers, "content-type": "image/png"})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == "red"
    assert keyed.get("/v2/models/color/config", headers=headers).status_code == 200


def test_health_is_open_by_default(keyed):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/color/ready"):
        assert keyed.get(path).status_code == 200, path


def test_health_wants_a_key_when_set(classifier, tmp_path):
    keys = key_file(tmp_path / "keys", KEY)
    with client_for(classifier, tmp_path, api_keys_file=keys, auth_health=True) as client:
        client.portal.call(classifier.start)
        try:
            for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/color/ready", "/livez", "/metrics"):
                assert_unauthorized(client.get(path))
            assert client.get("/v2/health/ready", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        finally:
            client.portal.call(classifier.stop)


def test_loading_a_model_wants_an_admin_key_not_an_api_key(classifier, tmp_path):
    keys, admin = key_file(tmp_path / "keys", KEY), key_file(tmp_path / "admin", OTHER_KEY)
    settings = ServiceSettings(model=classifier.settings.model, device="cpu", api_keys_file=keys, admin_keys_file=admin)
    access = AccessControl.from_settings(settings)
    app = create_app()
    attach(app, classifier, access)
    with TestClient(with_middlewares(app, asgi_middlewares(settings, access))) as client:
        client.portal.call(classifier.start)
        try:
            load = "/v2/repository/models/color/load"
            assert_unauthorized(client.post(load, headers={"Authorization": f"Bearer {KEY}"}))  # an API key
            assert_unauthorized(client.post(load))
            loaded = client.post(load, headers={"Authorization": f"Bearer {OTHER_KEY}"})
            assert (loaded.status_code, loaded.json()["version"]) == (200, "1")
            assert_unauthorized(client.post("/v2/repository/index", headers={"Authorization": f"Bearer {OTHER_KEY}"}))
            assert client.post("/v2/repository/index", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        finally:
            client.portal.call(classifier.stop)


ORIGIN = "https://app.example.com"


@pytest.fixture
def cors(classifier, tmp_path):
    keys = key_file(tmp_path / "keys", KEY)
    with client_for(classifier, tmp_path, api_keys_file=keys, cors_origins=f"{ORIGIN},http://localhost:8080") as client:
        client.portal.call(classifier.start)
        yield client
        client.portal.call(classifier.stop)


def test_cors_headers_only_for_allowed_origins(cors):
    headers = {"Authorization": f"Bearer {KEY}"}
    allowed = cors.get("/metadata", headers={**headers, "Origin": ORIGIN})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = cors.get("/metadata", headers={**headers, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_a_preflight_needs_no_key_and_a_401_carries_the_cors_headers(cors):
    preflight = cors.options(
        "/classify",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    refused = cors.post("/classify", content=PNG, headers={"Origin": ORIGIN, "content-type": "image/png"})
    assert_unauthorized(refused)
    assert refused.headers["access-control-allow-origin"] == ORIGIN  # so the page can read why
    denied = cors.options(
        "/classify", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in denied.headers


# --- the real server -----------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_served_keys_close_everything_but_the_page_and_no_key_reaches_the_log(tmp_path):
    package = make_color_package(tmp_path / "package")
    settings = {
        "VISIONSERVE_DEVICE": "cpu",
        "VISIONSERVE_API_KEYS_FILE": key_file(tmp_path / "keys", KEY),
        "VISIONSERVE_AUTH_HEALTH": "true",
        # The access log on, so that the test sees what a server that logs every request would write.
        "BENTOML_CONFIG_OPTIONS": "services.visionserve.logging.access.enabled=true",
    }
    env = {"VISIONSERVE_MODEL": str(package), "BENTOML_HOME": str(tmp_path / "bentoml"), **settings}
    server = BentoServer(SERVICE, env, log_dir=tmp_path).start("/docs.json")  # open, unlike /livez and /readyz
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            good = {"Authorization": f"Bearer {KEY}"}
            bad = {"Authorization": f"Bearer {OTHER_KEY}"}
            deadline = time.monotonic() + 120
            while client.get("/readyz", headers=good).status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            for path in ("/livez", "/readyz", "/metrics", "/v2/health/ready", "/metadata"):
                assert_unauthorized(client.get(path))
                assert_unauthorized(client.get(path, headers=bad))
                assert client.get(path, headers=good).status_code == 200, path
            response = client.post("/classify", content=PNG, headers={**good, "content-type": "image/png"})
            assert response.json()["predictions"][0]["label"] == "red"
            assert_unauthorized(client.post("/classify", content=PNG, headers={**bad, "content-type": "image/png"}))
            assert client.get("/docs.json").status_code == 200  # the page and its schema stay open
            assert client.get("/").status_code == 200
        triton = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the dev extra)")
        triton_client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            assert triton_client.get_model_config("color", headers=good)["name"] == "color"
            with pytest.raises(triton.InferenceServerException, match="API key"):
                triton_client.get_model_config("color", headers=bad)
        finally:
            triton_client.close()
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert "path=/classify" in log  # the access log was on
    assert KEY not in log and OTHER_KEY not in log
    assert hash_key(KEY).removeprefix("sha256:") not in log


@pytest.mark.e2e
@pytest.mark.parametrize("problem", ["missing", "not hashed"])
def test_a_bad_key_file_stops_bentoml_serve_with_one_line(tmp_path, problem):
    keys = tmp_path / "keys"
    if problem == "not hashed":
        keys.write_text(KEY + "\n")
    env = {
        **os.environ,
        "VISIONSERVE_MODEL": str(make_color_package(tmp_path / "package")),
        "VISIONSERVE_DEVICE": "cpu",
        "VISIONSERVE_API_KEYS_FILE": str(keys),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
    }
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--port", str(free_port())]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith(f"visionserve: cannot serve: VISIONSERVE_API_KEYS_FILE={keys}: "), output
    assert "Traceback" not in output and KEY not in output
