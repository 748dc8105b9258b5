"""The token matrix: every way a token can be good or bad, against a secret, a PEM
key, and a JWKS served by a local HTTP server (rotation, outage)."""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from chatd.adapters.keys import open_keys
from chatd.config import AuthConfig
from chatd.tokens import TokenError, TokenVerifier, mint

SECRET = "s" * 64
RESERVED = ("assistant",)


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "exp": now + 600, "chatd": {"convs": {"c1": "rw"}}, **over}


@asynccontextmanager
async def _verifier(**auth: Any):
    cfg = AuthConfig(mode="jwt", **auth)
    async with open_keys(cfg) as keys:
        yield TokenVerifier(cfg, keys, RESERVED), keys


async def _refused(verifier: TokenVerifier, token: str, match: str, code: str = "unauthorized"):
    with pytest.raises(TokenError, match=match) as info:
        await verifier.verify(token)
    assert info.value.code == code


async def test_hmac_token_matrix():
    async with _verifier(secret=SECRET, issuer="https://auth.example", audience="chatd") as (v, _):
        good = _claims(iss="https://auth.example", aud="chatd")
        identity = await v.verify(jwt.encode(good, SECRET, algorithm="HS256"))
        assert identity.user == "alice" and identity.via == "token"
        assert identity.grants.rights("c1") == "rw" and identity.grants.rights("c2") == ""
        assert identity.expires_at - trio.current_time() == pytest.approx(630, abs=5)

        def tok(**over: Any) -> str:
            return jwt.encode({**good, **over}, SECRET, algorithm="HS256")

        await _refused(v, tok(exp=int(time.time()) - 60), "expired", "token_expired")
        await _refused(v, tok(nbf=int(time.time()) + 600), "not valid yet")
        await _refused(v, jwt.encode(good, "x" * 40, algorithm="HS256"), "signature")
        await _refused(v, tok(iss="https://evil.example"), "issuer")
        await _refused(v, tok(aud="other-service"), "audience")
        await _refused(
            v, jwt.encode({k: x for k, x in good.items() if k != "exp"}, SECRET), "'exp'"
        )
        await _refused(
            v, jwt.encode({k: x for k, x in good.items() if k != "iss"}, SECRET), "'iss'"
        )
        await _refused(v, tok(sub="assistant"), "reserved")
        await _refused(v, tok(sub="al\u202eice"), "U\\+202E")
        await _refused(v, tok(chatd={"convs": {"c1": "admin"}}), "rights")
        await _refused(v, jwt.encode(good, SECRET, algorithm="HS512"), "'HS512' is not accepted")
        await _refused(v, "not.a.token", "well-formed")
        # alg "none": an unsigned token.
        unsigned = jwt.encode(good, None, algorithm="none")
        await _refused(v, unsigned, "'none' is not accepted")
        # Within the leeway (30 s), a just-expired token still passes.
        assert (await v.verify(tok(exp=int(time.time()) - 10))).user == "alice"


def _rsa() -> tuple[Any, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, pem


async def test_a_public_key_and_the_algorithm_confusion_attack(tmp_path):
    private, pem = _rsa()
    path = tmp_path / "pub.pem"
    path.write_bytes(pem)
    async with _verifier(algorithms=("RS256",), public_key_file=str(path)) as (v, _):
        assert (await v.verify(jwt.encode(_claims(), private, algorithm="RS256"))).user == "alice"
        # The classic confusion: an HS256 token whose "secret" is the public key.
        forged = _hs256_with_key(_claims(sub="mallory"), pem)
        await _refused(v, forged, "'HS256' is not accepted")
        other, _ = _rsa()
        await _refused(v, jwt.encode(_claims(), other, algorithm="RS256"), "signature")


def _hs256_with_key(claims: dict[str, Any], key: bytes) -> str:
    # PyJWT itself refuses an asymmetric key as an HMAC secret, so forge it by hand.
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(key, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()


class _JwksServer:
    """A JWKS over HTTP on a free local port; the test changes ``doc`` or takes it down."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = {"keys": []}
        self.up = True
        self.hits = 0
        self.port = 0

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            self.hits += 1
            if not self.up:
                await stream.send_all(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n")
                return
            body = json.dumps(self.doc).encode()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )


def _ec_jwk(kid: str, alg: str = "ES256") -> tuple[Any, dict[str, Any]]:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return key, {**jwk, "kid": kid, "alg": alg, "use": "sig"}


async def test_jwks_rotation_and_outage(nursery):
    server = _JwksServer()
    await nursery.start(server.run)
    k1, jwk1 = _ec_jwk("k1")
    server.doc = {"keys": [jwk1]}
    url = f"http://127.0.0.1:{server.port}/.well-known/jwks.json"
    async with _verifier(algorithms=("ES256",), jwks_url=url, jwks_refresh=2) as (v, keys):
        assert server.hits == 1, "fetched once at start"

        def tok(key: Any, kid: str, **over: Any) -> str:
            return jwt.encode(_claims(**over), key, algorithm="ES256", headers={"kid": kid})

        assert (await v.verify(tok(k1, "k1"))).user == "alice"
        assert server.hits == 1, "served from the cache"
        # Rotation: the issuer publishes k2 and signs with it; a token naming k2
        # makes chatd fetch again (at most every min(5 s, jwks_refresh)).
        k2, jwk2 = _ec_jwk("k2")
        server.doc = {"keys": [jwk1, jwk2]}
        await trio.sleep(2.1)
        assert (await v.verify(tok(k2, "k2", sub="bob"))).user == "bob"
        assert server.hits == 2
        await _refused(v, tok(k2, "k9"), "'k9' is not among")
        assert server.hits == 2, "an unknown kid right after a fetch does not fetch again"
        # A key signed by k2 but claiming k1 does not verify.
        await _refused(v, tok(k2, "k1"), "signature")
        # The JWKS endpoint goes down: the keys already known still work.
        server.up = False
        await keys.refresh()
        assert (await v.verify(tok(k1, "k1"))).user == "alice"
        # A key declared for another algorithm is refused for this one.
        server.up = True
        k3, jwk3 = _ec_jwk("k3", alg="ES384")
        server.doc = {"keys": [jwk1, jwk2, jwk3]}
        await trio.sleep(2.1)
        await _refused(v, tok(k3, "k3"), "is for ES384")


async def test_minted_tokens_verify():
    cfg = AuthConfig(mode="jwt", secret=SECRET, audience="chatd")
    token = mint(cfg, "carol", convs={"team-*": "r"}, operator=True, ttl=60)
    async with open_keys(cfg) as keys:
        identity = await TokenVerifier(cfg, keys, RESERVED).verify(token)
    assert identity.user == "carol" and identity.grants.operator
    assert identity.grants.rights("team-x") == "r"


async def test_the_token_command_grants_streams(tmp_path, capsys):
    from chatd.cli import main

    conf = tmp_path / "chatd.toml"
    conf.write_text(f'[auth]\nmode = "jwt"\nsecret = "{SECRET}"\n')
    code = main(
        ["--config", str(conf), "token", "dora", "--stream", "agents/*=rw", "--conv", "c=r"]
    )
    assert code == 0
    token = capsys.readouterr().out.strip()
    cfg = AuthConfig(mode="jwt", secret=SECRET)
    async with open_keys(cfg) as keys:
        grants = (await TokenVerifier(cfg, keys, RESERVED).verify(token)).grants
    assert grants.stream_rights("agents/7") == "rw" and grants.stream_rights("other") == ""
    assert grants.rights("c") == "r"
    assert main(["--config", str(conf), "token", "dora", "--stream", "x=z"]) == 2
