"""The gate, over real sockets: browser origins, connection caps, TLS; and the
start-up refusals that keep a development server off a public address."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from trio_websocket import ConnectionRejected, open_websocket_url

from chatd.config import ConfigError, config_from_dict
from chatd.server import serve
from tests.conftest import make_config


async def _hello(url: str, **kw) -> dict:
    async with open_websocket_url(url, **kw) as ws:
        await ws.send_message(json.dumps({"op": "hello", "user": "alice"}))
        return json.loads(await ws.get_message())


async def test_browser_origins_are_checked(nursery, postgres, redis_server):
    cfg = make_config(postgres, redis_server, server={"allowed_origins": ["https://app.example"]})
    srv = await nursery.start(serve, cfg)
    assert (await _hello(srv.url))["type"] == "welcome", "no Origin: not a browser"
    ok = [(b"origin", b"https://app.example")]
    assert (await _hello(srv.url, extra_headers=ok))["type"] == "welcome"
    own = [(b"origin", f"http://127.0.0.1:{srv.port}".encode())]
    assert (await _hello(srv.url, extra_headers=own))["type"] == "welcome", "same origin"
    with pytest.raises(ConnectionRejected) as rejected:
        await _hello(srv.url, extra_headers=[(b"origin", b"https://evil.example")])
    assert rejected.value.status_code == 403
    assert b"not allowed" in rejected.value.body
    assert srv.engine.gate.refused["origin"] == 1


async def test_connections_are_capped_per_address_and_in_all(nursery, postgres, redis_server):
    cfg = make_config(postgres, redis_server, limits={"connections_per_address": 2})
    srv = await nursery.start(serve, cfg)
    async with open_websocket_url(srv.url), open_websocket_url(srv.url):
        with pytest.raises(ConnectionRejected) as rejected:
            await _hello(srv.url)
        assert rejected.value.status_code == 503
        assert b"too many connections from this address" in rejected.value.body
    with trio.fail_after(5):
        while srv.engine.gate.connections:
            await trio.sleep(0.02)
    assert (await _hello(srv.url))["type"] == "welcome", "released when they closed"
    cfg = make_config(postgres, redis_server, limits={"max_connections": 1})
    srv = await nursery.start(serve, cfg)
    async with open_websocket_url(srv.url):
        with pytest.raises(ConnectionRejected, match="503"):
            await _hello(srv.url)


def _self_signed(tmp_path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


async def test_tls(nursery, postgres, redis_server, tmp_path):
    cert, key = _self_signed(tmp_path)
    cfg = make_config(postgres, redis_server, server={"tls_cert": cert, "tls_key": key})
    srv = await nursery.start(serve, cfg)
    assert srv.url.startswith("wss://")
    client = ssl.create_default_context(cafile=cert)
    assert (await _hello(srv.url, ssl_context=client))["type"] == "welcome"
    # The same TLS port serves HTTPS.
    import httpx

    assert srv.http_url.startswith("https://")
    async with httpx.AsyncClient(base_url=srv.http_url, verify=client) as http:
        assert (await http.get("/healthz")).status_code == 200


def test_a_development_server_stays_off_public_addresses():
    with pytest.raises(ConfigError, match="allow_remote_anonymous"):
        config_from_dict({"server": {"host": "0.0.0.0"}})
    assert config_from_dict(
        {"server": {"host": "0.0.0.0"}, "auth": {"allow_remote_anonymous": True}}
    )
    public_jwt = {"mode": "jwt", "secret": "q" * 32}
    assert config_from_dict({"server": {"host": "0.0.0.0"}, "auth": public_jwt})
    with pytest.raises(ConfigError, match="tls_cert and"):
        config_from_dict({"server": {"tls_cert": "cert.pem"}})


def test_bad_tls_files_fail_at_start_naming_the_key(tmp_path):
    from chatd.server import _tls

    cfg = config_from_dict({"server": {"tls_cert": str(tmp_path / "nope.pem"), "tls_key": "x"}})
    with pytest.raises(ConfigError, match="tls_cert"):
        _tls(cfg.server)
