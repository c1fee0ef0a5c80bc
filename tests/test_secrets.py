"""Secrets never leak: not into the data dir, the logs, responses or errors."""

from __future__ import annotations

import base64
import json
import logging
import re
import stat
from pathlib import Path
from urllib.parse import quote, quote_plus

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tokensvc import logs
from tokensvc.demo.authserver import AuthServer, Behaviour
from tokensvc.v1 import tokensvc_pb2 as pb

from support import CLIENT_ID, SECRET, Watcher, forms, running_service, scrape

PRIVATE_KEY = (
    rsa.generate_private_key(public_exponent=65537, key_size=2048)
    .private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    .decode()
)
WRONG_SECRET = "wrong-Secret:+%ü-9c2e"
pytestmark = pytest.mark.usefixtures("restore_logging")  # tests configure the root logger


async def test_no_secret_or_token_is_found_in_the_data_dir_logs_or_errors(
    tmp_path: Path, auth: AuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    logs.configure("debug")  # as the service does, at its most verbose
    logging.getLogger().addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    auth.add_client("other", WRONG_SECRET + "-real")
    errors: list[str] = []
    responses: list[bytes] = []
    data_dir = tmp_path / "data"
    async with running_service(data_dir, auth, run_scheduler=False) as h:
        responses.append((await h.register()).SerializeToString())
        responses.append((await h.register("other", secret=WRONG_SECRET)).SerializeToString())
        keyed = await h.register("keyed", None, private_key_pem=PRIVATE_KEY)
        responses.append(keyed.SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # this server does no private_key_jwt
            await h.tokens.GetToken(pb.GetTokenRequest(server_id="keyed"))
        errors.append(repr(refused.value) + str(refused.value.trailing_metadata()))
        responses.append(
            (await h.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))).SerializeToString()
        )
        for behaviour in (
            Behaviour(fail_status=500),
            Behaviour(
                fail_status=502,
                fail_body="<html>" + SECRET + "</html>",
                fail_content_type="text/html",
            ),
            Behaviour(),  # the wrong secret: invalid_client (last: it is not retried at once)
        ):
            auth.behaviour = behaviour
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await h.tokens.GetToken(pb.GetTokenRequest(server_id="other"))
            errors.append(repr(caught.value) + str(caught.value.trailing_metadata()))
        auth.behaviour = Behaviour()
        for request in (pb.GetServerRequest(id="alpha"), pb.GetServerRequest(id="other")):
            responses.append((await h.admin.GetServer(request)).SerializeToString())
        responses.append((await h.admin.ListServers(pb.ListServersRequest())).SerializeToString())
        on_disk_while_running = _data_files(data_dir)
    on_disk_after = _data_files(data_dir)
    for path in (data_dir / "tokensvc.db", data_dir / "keys"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    tokens = [t for t in auth.issued]
    assert tokens, "the test must have fetched a token"
    log_text = "\n".join(
        fmt.format(record)
        for record in caplog.records
        for fmt in (logs.TextFormatter(), logs.JsonFormatter())
    )
    assert "token fetched" in log_text and "alpha" in log_text
    key_lines = [line for line in PRIVATE_KEY.splitlines() if "-----" not in line]
    for secret in (SECRET, WRONG_SECRET, *tokens, *key_lines):
        for form in forms(secret):
            assert form not in on_disk_while_running and form not in on_disk_after
            assert form.decode(errors="ignore") not in log_text
            assert all(form.decode(errors="ignore") not in e for e in errors)
    for secret in (SECRET, WRONG_SECRET, *key_lines):
        assert all(secret.encode() not in r for r in responses)
    # The broker's own token is the one secret a response may carry.
    assert tokens[0].encode() in responses[3]


def _data_files(data_dir: Path) -> bytes:
    """Everything in the data dir but the key file: database, WAL, shared memory."""
    return b"".join(
        p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file() and p.name != "keys"
    )


ECHOED = "echo Me:+%/é€ 7b~"  # a space, reserved characters and non-ASCII
ECHO_CLIENT = "echo client"


def echoed_forms() -> dict[str, str]:
    """The encodings in which authorization servers have been seen to echo
    what they received back inside ``error_description``."""
    pair = f"{ECHO_CLIENT}:{ECHOED}".encode()
    form_pair = f"{quote_plus(ECHO_CLIENT)}:{quote_plus(ECHOED)}".encode()
    percent = quote(ECHOED, safe="")
    return {
        "raw": ECHOED,
        "form-encoded": quote_plus(ECHOED),
        "percent-encoded": percent,
        "lower-case percent": re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), percent),
        "base64": base64.b64encode(ECHOED.encode()).decode(),
        "base64url, unpadded": base64.urlsafe_b64encode(ECHOED.encode()).decode().rstrip("="),
        "base64 of the basic pair": base64.b64encode(form_pair).decode(),
        "base64 of id:secret": base64.b64encode(pair).decode(),
        "the whole header": "Basic " + base64.b64encode(form_pair).decode(),
    }


async def test_a_secret_echoed_back_in_any_encoding_is_masked_everywhere(
    tmp_path: Path, auth: AuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    logs.configure("debug")
    logging.getLogger().addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    auth.add_client(ECHO_CLIENT, ECHOED)
    echoes = echoed_forms()
    ids = [f"echo-{i}" for i in range(len(echoes))]
    seen: list[str] = []
    data_dir = tmp_path / "data"
    async with running_service(data_dir, auth, run_scheduler=False) as h:
        for server_id in ids:
            await h.register(server_id, secret=ECHOED, client_id=ECHO_CLIENT)
        watcher = Watcher(h.tokens, *ids)
        await watcher.until("synced")
        for server_id, echo in zip(ids, echoes.values(), strict=True):
            auth.behaviour = Behaviour(
                fail_status=400,
                fail_body=json.dumps(
                    {"error": "invalid_request", "error_description": f"got [{echo}] here"}
                ),
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await h.tokens.GetToken(pb.GetTokenRequest(server_id=server_id))
            seen.append(repr(caught.value) + str(caught.value.trailing_metadata()))
            tested = await h.admin.TestServer(pb.TestServerRequest(id=server_id))
            seen.append(str(tested))
            failed = await watcher.until("failed", server_id=server_id)
            seen.append(str(failed))
            seen.append(str(await h.admin.GetServer(pb.GetServerRequest(id=server_id))))
        seen.append(str(await h.admin.ListServers(pb.ListServersRequest())))
        await watcher.close()
    seen.append(_data_files(data_dir).decode(errors="replace"))
    seen.append("\n".join(logs.JsonFormatter().format(r) for r in caplog.records))
    assert "got [***] here" in seen[0], seen[0]  # the echo arrived, masked
    for name, echo in echoes.items():
        for text in seen:
            assert echo not in text, (name, text[:300])


async def test_no_secret_or_token_is_found_in_the_metrics(tmp_path: Path, auth: AuthServer) -> None:
    auth.add_client("other", WRONG_SECRET + "-real")
    async with running_service(
        tmp_path / "data", auth, run_scheduler=False, metrics_listen="127.0.0.1:0"
    ) as h:
        await h.register()
        await h.register("other", secret=WRONG_SECRET)
        watcher = Watcher(h.tokens, "alpha")
        await watcher.until("synced")
        await h.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
        with pytest.raises(grpc.aio.AioRpcError):
            await h.tokens.GetToken(pb.GetTokenRequest(server_id="other"))
        await watcher.close()
        text = (await scrape(h.service.metrics_port)).encode()
    assert b'server_id="alpha"' in text and b"credentials_rejected" in text
    assert auth.issued, "the test must have fetched a token"
    basic = [f"{CLIENT_ID}:{SECRET}", f"other:{WRONG_SECRET}"]
    for secret in (SECRET, WRONG_SECRET, *basic, *auth.issued):
        for form in forms(secret):
            assert form not in text, form
