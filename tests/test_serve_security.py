"""`sdxl serve`'s security rules and limits, each with a request that breaks it."""

import base64
import io
import secrets

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_fixtures import FAST, live_server, tiny_models  # noqa: F401  (fixtures)

from sdxl.cli import main
from sdxl.serve.config import Limits

AUTH = ("user", "s3cret")


@pytest.fixture(scope="module")
def guarded(tiny_models, tmp_path_factory):
    limits = Limits(max_body_bytes=100_000, max_image_pixels=256 * 256)
    with live_server(tmp_path_factory.mktemp("out"), tiny_models, api_auth=":".join(AUTH), limits=limits) as live:
        yield live


def post(live, body, auth=AUTH, **kw) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/jobs", json=body, auth=auth, timeout=60, **kw)


def png_b64(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_basic_auth_required(guarded):
    assert post(guarded, {"prompt": "x", **FAST}, auth=None).status_code == 401
    r = post(guarded, {"prompt": "x", **FAST}, auth=("user", "wrong"))
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(f"{guarded.url}/v1/models", auth=("wrong", "s3cret")).status_code == 401
    assert httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": "Basic !!notbase64"}).status_code == 401
    assert post(guarded, {"prompt": "x", **FAST}).status_code == 201


def test_basic_auth_compared_in_constant_time(guarded, monkeypatch):
    calls = []
    real = secrets.compare_digest
    monkeypatch.setattr(secrets, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert httpx.get(f"{guarded.url}/v1/models", auth=("user", "nope")).status_code == 401
    assert calls == [(b"user:nope", b"user:s3cret")]


@pytest.mark.parametrize("method", ["POST", "DELETE"])
@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Origin": "null"},
                                     {"Sec-Fetch-Site": "cross-site"}])
def test_cross_origin_state_changes_refused(guarded, method, headers):
    r = httpx.request(method, f"{guarded.url}/v1/jobs" + ("/x" if method == "DELETE" else ""), auth=AUTH,
                      json={"prompt": "x", **FAST}, headers=headers)
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]


def test_same_origin_and_plain_clients_accepted(guarded):
    port = guarded.config.port
    assert post(guarded, {"prompt": "x", **FAST}, headers={"Origin": f"http://127.0.0.1:{port}"}).status_code == 201
    assert httpx.get(f"{guarded.url}/v1/models", auth=AUTH, headers={"Origin": "http://evil.example"}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example:{port}", "127.0.0.1:1", "attacker.localhost.example:{port}", ""])
def test_foreign_host_refused_dns_rebinding(guarded, host):
    r = httpx.get(f"{guarded.url}/v1/models", auth=AUTH, headers={"Host": host.format(port=guarded.config.port)})
    assert r.status_code == 403 and "Host" in r.json()["detail"]
    r = httpx.get(f"{guarded.url}/v1/models", auth=AUTH, headers={"Host": f"localhost:{guarded.config.port}"})
    assert r.status_code == 200


def test_allowed_host_accepted_on_any_port(tiny_models, tmp_path):
    with live_server(tmp_path, tiny_models, allowed_hosts=("sd.example.org",)) as live:
        get = lambda host: httpx.get(f"{live.url}/v1/models", headers={"Host": host}).status_code
        assert [get("sd.example.org"), get("sd.example.org:443"), get("evil.example")] == [200, 200, 403]
        r = httpx.post(f"{live.url}/v1/jobs", json={"prompt": "x", **FAST},
                       headers={"Host": "sd.example.org", "Origin": "https://sd.example.org"})
        assert r.status_code == 201


@pytest.mark.parametrize("body, limit, field", [
    ({"prompt": "x", "steps": 501, "width": 64, "height": 64}, "max_steps", "steps"),
    ({"prompt": "x", "hires_scale": 1.5, "hires_steps": 600, **FAST}, "max_steps", "hires_steps"),
    ({"prompt": "x", "batch": 8, "n_iter": 9, **FAST}, "max_images", "batch"),
    ({"prompt": "x" * 8193, **FAST}, "max_prompt_chars", "prompt"),
    ({"prompt": "x", "negative_prompt": "y" * 8193, **FAST}, "max_prompt_chars", "negative_prompt"),
    ({"prompt": "x", "steps": 2, "init_image": png_b64((300, 300))}, "max_image_pixels", "init_image"),
])
def test_limits_named(guarded, body, limit, field):
    r = post(guarded, body)
    assert r.status_code == 422 and limit in r.json()["detail"] and r.json()["field"] == field


@pytest.mark.parametrize("body, words, field", [
    ({"prompt": "x", "width": 4104, "height": 64, "steps": 2}, "4096", None),
    ({"prompt": "x", "width": 60, "height": 64, "steps": 2}, "multiples of 8", "width"),
    ({"prompt": "x", "steps": "many"}, "steps must be an integer", "steps"),
    ({"prompt": "x", "n_iter": 0}, "n_iter", "n_iter"),
    ({"steps": 2}, "no prompt", "prompt"),
    ({"prompt": "x", "colour": "red"}, "unknown setting", "colour"),
    ({"prompt": "x", "steps": 2, "crop": [-1, -1]}, "crop must be in 0..65536", "crop"),
    ({"prompt": "x", "steps": 2, "original_size": [-5, 99999999999]}, "original-size must be in 0..65536",
     "original_size"),
])
def test_request_rules_422(guarded, body, words, field):
    r = post(guarded, body)
    assert r.status_code == 422 and words in r.json()["detail"]
    assert field is None or r.json()["field"] == field


def test_body_size_limit(guarded):
    big = {"prompt": "x", "init_image": "A" * 120_000}
    r = post(guarded, big)
    assert r.status_code == 422 and "max_body_bytes" in r.json()["detail"]
    chunked = httpx.post(f"{guarded.url}/v1/jobs", auth=AUTH, content=iter([b'{"prompt": "', b"x" * 120_000, b'"}']))
    assert chunked.status_code == 422 and "max_body_bytes" in chunked.json()["detail"]


def test_decompression_bomb_refused(guarded):
    r = post(guarded, {"prompt": "x", "steps": 2, "mask": png_b64((5000, 5000))})
    assert r.status_code in (422,) and "pixels" in r.json()["detail"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/x.png", "https://example.com/a.png", "file:///etc/passwd"])
def test_urls_never_fetched(guarded, url):
    r = post(guarded, {"prompt": "x", "steps": 2, "init_image": url})
    assert r.status_code == 422 and "never fetched" in r.json()["detail"]


@pytest.mark.parametrize("field, name", [("model", "../checkpoints/tiny.safetensors"), ("model", "/etc/passwd"),
                                         ("vae", "..\\..\\x"), ("refiner", "nope"), ("loras", [["../style", 1]])])
def test_file_names_resolved_inside_their_folder(guarded, field, name):
    r = post(guarded, {"prompt": "x", field: name, **FAST})
    assert r.status_code == 422 and ("not a path" in r.json()["detail"] or "no such file" in r.json()["detail"])


def test_lora_tag_path_refused(guarded):
    r = post(guarded, {"prompt": "x <lora:../../etc/passwd:1>", **FAST})
    assert r.status_code == 422 and "not a path" in r.json()["detail"]


def test_pickle_listed_as_refused_never_loaded(tiny_models, tmp_path):
    (tiny_models / "checkpoints" / "evil.ckpt").write_bytes(b"\x80\x04pickle")
    try:
        with live_server(tmp_path, tiny_models) as live:
            listed = {m["name"]: m for m in httpx.get(f"{live.url}/v1/models").json()["checkpoints"]}
            assert "pickle" in listed["evil.ckpt"]["refused"]
            r = httpx.post(f"{live.url}/v1/jobs", json={"prompt": "x", "model": "evil.ckpt", **FAST})
            assert r.status_code == 422 and "refused" in r.json()["detail"]
    finally:
        (tiny_models / "checkpoints" / "evil.ckpt").unlink()


@pytest.mark.parametrize("argv, words", [
    (["serve", "--host", "0.0.0.0"], "without --api-auth"),
    (["serve", "--api-auth", "nocolon"], "USER:PASS"),
    (["serve", "--models-dir", "/nonexistent-models"], "no such folder"),
])
def test_serve_refuses_unsafe_or_bad_settings(argv, words, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("must not start"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) <= 2


def test_serve_exposed_with_auth_or_insecure_starts(capsys, monkeypatch, tmp_path):
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **k: started.append((app.state.config, k)))
    assert main(["serve", "--host", "0.0.0.0", "--insecure", "--output-dir", str(tmp_path)]) == 0
    assert "warning" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--api-auth", "a:b", "--output-dir", str(tmp_path)]) == 0
    assert main(["serve", "--output-dir", str(tmp_path)]) == 0
    assert [k["host"] for _, k in started] == ["0.0.0.0", "0.0.0.0", "127.0.0.1"]
    assert [c.port for c, _ in started] == [7860] * 3 and started[2][0].models_dir is None


@pytest.mark.parametrize("name", ["Origin", "Host", "Authorization"])
def test_a_security_header_given_twice_is_refused(guarded, name):
    """Raw HTTP (clients refuse to send it): a foreign value first, this server's own last; the check must not
    read only the last one."""
    import socket

    host, port = guarded.url.removeprefix("http://").rsplit(":", 1)
    own = {"Origin": f"http://{host}:{port}", "Host": f"{host}:{port}",
           "Authorization": httpx.BasicAuth(*AUTH)._auth_header}
    foreign = {"Origin": "http://evil.example", "Host": "evil.example", "Authorization": "Basic eDp4"}
    lines = [f"{k}: {v}" for k, v in own.items() if k != name] + [f"{name}: {foreign[name]}", f"{name}: {own[name]}"]
    body = b'{"prompt": "x", "steps": 2}'
    request = ("POST /v1/jobs HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    if name == "Host":  # the HTTP server itself (h11) already answers a repeated Host with 400
        assert reply.startswith(b"HTTP/1.1 400"), reply[:300]
    else:
        assert reply.startswith(b"HTTP/1.1 403") and b"given more than once" in reply, reply[:300]


def test_a_truncated_image_is_named_shortly(guarded):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, "PNG")
    cut = base64.b64encode(buf.getvalue()[: len(buf.getvalue()) // 2]).decode()
    r = post(guarded, {"prompt": "x", "steps": 2, "init_image": cut})
    assert r.status_code == 422 and "not a readable image" in r.json()["detail"], r.text
    assert len(r.text) < 300  # the message names the image by its size, never echoes its bytes
