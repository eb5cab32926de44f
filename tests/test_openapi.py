"""Tests of the OpenAPI description (service.openapi): every route of the app is described with its methods and the
codes it really answers; BentoML's schema (/docs.json) and page (/) show it, and the page's "Try it out" classifies
an image in a real browser. Also the JSON 404 of a path that no route has, beside BentoML's own routes."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import httpx
import pytest
from fastapi.openapi.utils import get_openapi
from PIL import Image
from starlette.routing import Route
from starlette.testclient import TestClient

from inference.imaging import encode_png
from service import openapi
from service.app import FallbackRoute, attach, create_app
from service.auth import AccessControl, hash_key
from service.classifier import Classifier
from service.classify_routes import RAW_IMAGE_TYPES
from service.errors import ERRORS
from service.settings import ServiceSettings
from tests.support.color_package import color_pixels, make_color_package
from tests.support.servers import SERVICE_TEST_SETTINGS

API_KEYS = AccessControl(api_keys=(bytes.fromhex(hash_key("k").removeprefix("sha256:")),))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(TestClient, app, Contract): the service's app over the colour package with the test server's settings."""
    package = make_color_package(tmp_path_factory.mktemp("openapi") / "color")
    settings = ServiceSettings.from_env({**SERVICE_TEST_SETTINGS, "VISIONSERVE_MODEL": str(package)})
    classifier = Classifier(settings)
    app = create_app()
    attach(app, classifier)
    contract = openapi.Contract.of(settings, classifier.package, AccessControl())
    with TestClient(app) as client:
        client.portal.call(classifier.start)
        yield client, app, contract
        client.portal.call(classifier.stop)


def documented_codes(spec: dict) -> dict[str, set[str]]:
    """{status: codes} of one operation's error responses ("default" included)."""
    codes = {}
    for status, response in spec["responses"].items():
        schema = response.get("content", {}).get("application/json", {}).get("schema", {})
        enum = schema.get("properties", {}).get("code", {}).get("enum")
        if enum:
            codes[status] = set(enum)
    return codes


def test_every_route_of_the_app_is_described_with_its_methods(served):
    _, app, contract = served
    described = openapi.operations(contract)
    routes = {}
    for route in app.routes:
        if isinstance(route, Route):
            routes[route.path] = {method.lower() for method in route.methods} - {"head"}
        else:
            assert isinstance(route, FallbackRoute)
    assert isinstance(app.routes[-1], FallbackRoute)  # a partial match behind every route: their 405s come first
    assert routes == {path: set(by_method) for path, by_method in described.items()}


def test_every_error_code_is_documented_with_its_status_and_an_example(served):
    _, _, contract = served
    with_keys = dataclasses.replace(contract, access=API_KEYS)
    seen: set[str] = set()
    for by_method in openapi.operations(with_keys).values():
        for spec in by_method.values():
            for status, codes in documented_codes(spec).items():
                seen |= codes
                if status == "default":
                    continue
                assert {ERRORS[code].status for code in codes} == {int(status)}
                examples = spec["responses"][status]["content"]["application/json"]["examples"]
                assert set(examples) == codes
                assert all(examples[code]["value"]["code"] == code for code in codes)
            assert "500" in spec["responses"] and "default" in spec["responses"]
    # invalid_input is Classifier.infer's own check, for callers beside the routes: they refuse such pixels first.
    assert seen == set(ERRORS) - {"invalid_input"}


PNG = {"content-type": "image/png"}
TRUNCATED_PNG = encode_png(color_pixels("red")[0])[:60]
INFER = "/v2/models/{name}/infer"
EMPTY_PIXELS = {"name": "pixels", "datatype": "UINT8", "shape": [0, 32, 32, 3], "data": []}
NOT_AN_IMAGE = {"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AAAA"]}

# Requests that each route refuses, with the code it answers (code, method, path template, URL, request): every
# answer's code must be one that the route's description lists under that status.
REFUSALS = [
    ("invalid_top_k", "post", "/classify", "/classify?top_k=0", {"content": b"x", "headers": PNG}),
    ("unsupported_media_type", "post", "/classify", "/classify", {"content": b"x"}),
    ("pickle_refused", "post", "/classify", "/classify", {"content": b"x", "headers": {"content-type": "x-pickle"}}),
    ("body_too_large", "post", "/classify", "/classify", {"content": b"\0" * 600_000, "headers": PNG}),
    ("missing_image", "post", "/classify", "/classify", {"data": {"top_k": "1"}, "files": {"x": ("x.png", b"x")}}),
    ("url_not_supported", "post", "/classify", "/classify", {"json": {"url": "http://example.com/cat.jpg"}}),
    ("invalid_base64", "post", "/classify", "/classify", {"json": {"image": "abc"}}),
    (
        "invalid_json",
        "post",
        "/classify",
        "/classify",
        {"content": b"{", "headers": {"content-type": "application/json"}},
    ),
    ("empty", "post", "/classify", "/classify", {"content": b"", "headers": PNG}),
    ("unsupported_format", "post", "/classify", "/classify", {"content": b"not an image", "headers": PNG}),
    ("corrupt", "post", "/classify", "/classify", {"content": TRUNCATED_PNG, "headers": PNG}),
    ("no_images", "post", "/classify_batch", "/classify_batch", {"files": {"x": ("x.png", b"x")}}),
    ("unsupported_media_type", "post", "/classify_batch", "/classify_batch", {"content": b"x", "headers": PNG}),
    ("too_many_images", "post", "/classify_batch", "/classify_batch", {"files": [("images", ("x.png", b"x"))] * 9}),
    ("model_not_found", "post", "/classify", "/classify?model=nope", {"content": b"x", "headers": PNG}),
    ("version_not_found", "post", "/classify_batch", "/classify_batch?version=9", {"files": {"x": ("x.png", b"x")}}),
    (
        "invalid_model_choice",
        "post",
        "/classify",
        "/classify?model=color",
        {"json": {"image": "aGk=", "model": "other"}},
    ),
    ("model_not_found", "get", "/metadata", "/metadata?model=nope", {}),
    ("invalid_request", "post", "/v2/repository/index", "/v2/repository/index", {"json": {"x": 1}}),
    ("unauthorized", "post", "/v2/repository/models/{name}/load", "/v2/repository/models/color/load", {}),
    ("unauthorized", "post", "/v2/repository/models/{name}/unload", "/v2/repository/models/color/unload", {}),
    ("model_not_found", "get", "/v2/models/{name}", "/v2/models/nope", {}),
    ("version_not_found", "get", "/v2/models/{name}/versions/{version}", "/v2/models/color/versions/9", {}),
    ("model_not_found", "get", "/v2/models/{name}/config", "/v2/models/nope/config", {}),
    ("model_not_found", "get", "/v2/models/{name}/stats", "/v2/models/nope/stats", {}),
    ("model_not_found", "get", "/v2/models/{name}/ready", "/v2/models/nope/ready", {}),
    ("invalid_json", "post", INFER, "/v2/models/color/infer", {"content": b"{"}),
    ("invalid_request", "post", INFER, "/v2/models/color/infer", {"json": {"inputs": []}}),
    ("empty_batch", "post", INFER, "/v2/models/color/infer", {"json": {"inputs": [EMPTY_PIXELS]}}),
    ("unsupported_format", "post", INFER, "/v2/models/color/infer", {"json": {"inputs": [NOT_AN_IMAGE]}}),
]


@pytest.mark.parametrize(("code", "method", "template", "url", "request_kwargs"), REFUSALS)
def test_refusals_answer_codes_that_the_route_documents(served, code, method, template, url, request_kwargs):
    client, _, contract = served
    response = client.request(method.upper(), url, **request_kwargs)
    assert response.json()["code"] == code, response.text
    documented = documented_codes(openapi.operations(contract)[template][method])
    assert code in documented.get(str(response.status_code), set()), (code, response.status_code)


def test_descriptions_carry_the_settings_and_the_package(served):
    _, _, contract = served
    described = openapi.operations(contract)
    classify = described["/classify"]["post"]
    assert str(contract.settings.max_body_bytes) in classify["description"]
    assert classify["parameters"][0]["schema"]["maximum"] == len(contract.class_names) == 3
    media_types = {"multipart/form-data", *RAW_IMAGE_TYPES, "application/json"}
    assert set(classify["requestBody"]["content"]) == media_types >= {"image/jpeg", "image/png", "image/webp"}
    batch = described["/classify_batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert batch["properties"]["images"]["maxItems"] == contract.settings.max_batch_images == 8
    config = described["/v2/models/{name}/config"]["get"]["responses"]["200"]["content"]["application/json"]
    assert config["example"]["max_batch_size"] == 8


def test_the_json_example_classifies_as_it_stands(served):
    # The page's "Try it out" sends the example unchanged: it must be a request the route accepts.
    client, _, contract = served
    example = openapi.operations(contract)["/classify"]["post"]["requestBody"]["content"]["application/json"]
    response = client.post("/classify", json=example["example"])
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == "red"


def test_with_api_keys_the_operations_declare_the_bearer_scheme(served):
    _, _, contract = served
    app = openapi.schema_app(dataclasses.replace(contract, access=API_KEYS))
    schema = get_openapi(title="t", version="1", routes=app.routes)  # what BentoML's generate_spec calls
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key",
    }
    assert schema["paths"]["/classify"]["post"]["security"] == [{"apiKey": []}]
    assert "401" in schema["paths"]["/classify"]["post"]["responses"]
    assert "security" not in schema["paths"]["/v2/health/live"]["get"]  # health stays open by default


def test_the_schema_app_carries_the_operations_as_they_are(served):
    _, _, contract = served
    app = openapi.schema_app(contract)
    schema = get_openapi(title="t", version="1", routes=app.routes)  # what BentoML's generate_spec calls
    assert "components" not in schema  # no keys: no security scheme, and FastAPI adds no models of its own
    for path, by_method in openapi.operations(contract).items():
        for method, spec in by_method.items():
            got = schema["paths"][path][method]
            assert got == spec  # nothing added: no "security", no FastAPI "422"
    # Were a documented route missing from the service's app (before attach), it would answer as that app does.
    with TestClient(app) as client:
        response = client.get("/v2/models/color/config")
    assert (response.status_code, response.json()["code"]) == (503, "not_ready")


# --- the real server: BentoML's schema and page ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(color_service):
    with httpx.Client(base_url=color_service.url, timeout=30) as client:
        yield client


@pytest.mark.e2e
def test_bentoml_docs_json_lists_every_route_beside_its_own(http, served):
    _, _, contract = served
    schema = http.get("/docs.json").json()
    for path, by_method in openapi.operations(contract).items():
        assert set(by_method) <= set(schema["paths"].get(path, {})), path
    assert {"/livez", "/readyz", "/metrics"} <= set(schema["paths"])
    classify = schema["paths"]["/classify"]["post"]
    assert "invalid_top_k" in documented_codes(classify)["400"]


@pytest.mark.e2e
def test_a_path_that_no_route_has_gets_the_json_404_and_bentomls_routes_still_answer(http):
    response = http.get("/no/such/route")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "no route for GET /no/such/route", "code": "not_found"}
    assert http.post("/v2/models/color/nope", json={}).json()["code"] == "not_found"
    assert http.get("/classify").json()["code"] == "method_not_allowed"  # a route's 405 still comes first
    for path in ("/livez", "/readyz", "/metrics", "/docs.json", "/"):
        assert http.get(path).status_code == 200, path
    assert "swagger-ui" in http.get("/").text


def jpeg(label: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(color_pixels(label, size=(64, 48))[0]).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.e2e
@pytest.mark.slow
def test_the_api_page_classifies_an_uploaded_jpeg_in_a_browser(color_service, tmp_path):
    """BentoML's page in headless Chromium: open /classify, "Try it out", upload a JPEG, "Execute", read the answer."""
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "red.jpg"
    image.write_bytes(jpeg("red"))
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.page_load_strategy = "eager"  # the page's analytics script cannot load offline; Swagger UI needs no more
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(color_service.url + "/")
        summary = wait.until(
            until.element_to_be_clickable((By.CSS_SELECTOR, '.opblock-summary-path[data-path="/classify"]'))
        )
        summary.click()
        block = summary.find_element(By.XPATH, "./ancestor::div[contains(@class, 'opblock ')]")
        wait.until(lambda _: block.find_element(By.CSS_SELECTOR, "button.try-out__btn")).click()
        upload = wait.until(lambda _: block.find_element(By.CSS_SELECTOR, "input[type=file]"))
        upload.send_keys(str(image))
        block.find_element(By.CSS_SELECTOR, "button.execute").click()
        answer = wait.until(
            lambda _: next(
                (
                    element.text
                    for element in block.find_elements(
                        By.CSS_SELECTOR, ".live-responses-table .response-col_description pre"
                    )
                    if "predictions" in element.text
                ),
                None,
            )
        )
        status = block.find_element(By.CSS_SELECTOR, ".live-responses-table tbody td.response-col_status").text
    finally:
        driver.quit()
    assert status.strip() == "200"
    body = json.loads(answer)
    assert body["predictions"][0]["label"] == "red"
