"""The repository on SQLite and on a fresh PostgreSQL database."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from tokensvc.crypto import KeyRing, generate_key_entry
from tokensvc.errors import ConfigurationError, DecryptionError, RevisionMismatch, ServerNotFound
from tokensvc.registration import (
    Credential,
    CredentialKind,
    PreviousCredential,
    ServerSpec,
    plan_revision,
)
from tokensvc.store import Store
from tokensvc.store.tables import audit_events, servers, tokens
from tokensvc.token import Secret, Token, utcnow


def spec(server_id: str = "alpha", **changes: object) -> ServerSpec:
    base = ServerSpec(
        id=server_id,
        mcp_url="https://mcp.example.com/mcp",
        token_endpoint="https://as.example.com/token",
        client_id="client-1",
        scopes=("read",),
    )
    return ServerSpec(**{**{f: getattr(base, f) for f in ServerSpec.__slots__}, **changes})


def secret(value: str = "s3cret-value") -> Credential:
    return Credential(CredentialKind.CLIENT_SECRET, Secret(value))


def token(value: str = "access-token-1", seconds: int = 60) -> Token:
    now = utcnow()
    return Token(value, "Bearer", now, now + timedelta(seconds=seconds), ("read",))


KEEP, DROP, UNCHANGED = (
    PreviousCredential.KEEP,
    PreviousCredential.DROP,
    PreviousCredential.UNCHANGED,
)


@pytest.mark.parametrize(
    ("new", "credential", "discovery", "holds", "previous", "fields", "revised", "keep"),
    [
        (spec(), False, False, False, UNCHANGED, (), False, False),
        (
            spec(refresh_fraction=0.7),
            False,
            False,
            False,
            UNCHANGED,
            ("refresh_fraction",),
            False,
            False,
        ),
        (spec(scopes=("write",)), False, False, False, UNCHANGED, ("scopes",), True, False),
        (spec(), True, False, False, UNCHANGED, ("credential",), True, False),
        (spec(), False, True, False, UNCHANGED, ("discovery",), True, False),
        # keep: only when the credential changes; the fallback alone keeps the revision
        (spec(), True, False, False, KEEP, ("credential", "previous_credential"), True, True),
        (spec(), False, False, True, KEEP, (), False, False),
        # drop: only a fallback that is there, and without a new revision
        (spec(), False, False, True, DROP, ("previous_credential",), False, False),
        (spec(), False, False, False, DROP, (), False, False),
        (spec(), False, False, True, UNCHANGED, (), False, False),
    ],
)
def test_the_revision_rules(
    new: ServerSpec,
    credential: bool,
    discovery: bool,
    holds: bool,
    previous: PreviousCredential,
    fields: tuple[str, ...],
    revised: bool,
    keep: bool,
) -> None:
    plan = plan_revision(
        spec(),
        new,
        credential_changed=credential,
        discovery_changed=discovery,
        holds_previous=holds,
        previous=previous,
    )
    assert (plan.fields, plan.changed, plan.revised) == (fields, bool(fields), revised)
    assert plan.keep_old_credential is keep


async def test_registering_the_same_server_twice_changes_nothing(store: Store) -> None:
    first = await store.register(spec(), secret(), actor="t")
    again = await store.register(spec(), secret(), actor="t")
    unchanged = await store.register(spec(), None, actor="t")
    assert [r.changed for r in (first, again, unchanged)] == [True, False, False]
    assert [r.record.revision for r in (first, again, unchanged)] == [1, 1, 1]
    assert again.record.update_time == first.record.update_time


async def test_a_new_refresh_fraction_is_kept_without_a_new_revision(store: Store) -> None:
    record = (await store.register(spec(), secret())).record
    await store.save_token("alpha", record.incarnation, 1, token())
    result = await store.register(spec(refresh_fraction=0.7), None)
    assert result.changed and not result.revised and result.record.revision == 1
    assert result.record.spec.refresh_fraction == 0.7
    assert (await store.load_for_fetch("alpha")).token is not None


@pytest.mark.parametrize(
    "change",
    [
        {"token_endpoint": "https://other.example.com/token"},
        {"scopes": ("read", "write")},
        {"resource": "https://mcp.example.com/"},
        {"audience": "api://x"},
        {"client_id": "client-2"},
    ],
)
async def test_a_changed_registration_bumps_revision_and_drops_the_token(
    store: Store, change: dict[str, object]
) -> None:
    record = (await store.register(spec(), secret())).record
    assert await store.save_token("alpha", record.incarnation, 1, token()) is not None
    result = await store.register(spec(**change), None)
    assert result.revised and result.record.revision == 2
    assert (await store.load_for_fetch("alpha")).token is None


async def test_a_new_secret_bumps_revision_and_is_used(store: Store) -> None:
    await store.register(spec(), secret("old"))
    result = await store.register(spec(), secret("new"))
    assert result.revised and result.record.revision == 2
    assert (await store.load_for_fetch("alpha")).credential.value.reveal() == "new"


async def test_expected_revision_guards_against_lost_updates(store: Store) -> None:
    with pytest.raises(ServerNotFound):
        await store.get_server("alpha")
    await store.register(spec(), secret(), expected_revision=-1)
    with pytest.raises(RevisionMismatch, match="is at revision 1"):
        await store.register(spec(), secret(), expected_revision=-1)
    with pytest.raises(RevisionMismatch) as caught:
        await store.register(spec(audience="x"), None, expected_revision=7)
    assert caught.value.metadata() == {"revision": "1"}
    record = (await store.register(spec(audience="x"), None, expected_revision=1)).record
    assert record.revision == 2 and record.spec.audience == "x"


async def test_a_token_fetched_under_an_older_revision_is_not_saved(store: Store) -> None:
    record = (await store.register(spec(), secret())).record
    await store.register(spec(scopes=("write",)), None)
    assert await store.save_token("alpha", record.incarnation, record.revision, token()) is None
    assert (await store.load_for_fetch("alpha")).token is None


async def test_a_token_of_a_deleted_and_recreated_server_is_not_saved(store: Store) -> None:
    old = (await store.register(spec(), secret())).record
    await store.delete("alpha")
    new = (await store.register(spec(), secret())).record
    assert new.revision == old.revision == 1
    assert await store.save_token("alpha", old.incarnation, 1, token()) is None
    saved = await store.save_token("alpha", new.incarnation, 1, token())
    assert saved is not None and saved.version == 1


async def test_each_saved_token_gets_the_next_version(store: Store) -> None:
    record = (await store.register(spec(), secret())).record
    versions = []
    for i in range(3):
        saved = await store.save_token("alpha", record.incarnation, 1, token(f"t{i}"))
        assert saved is not None
        versions.append(saved.version)
    assert versions == [1, 2, 3]
    loaded = (await store.load_for_fetch("alpha")).token
    assert loaded is not None and loaded.token.access_token == "t2" and loaded.version == 3
    assert (await store.get_server("alpha")).status.token_version == 3


async def test_concurrent_saves_never_lose_a_version(store: Store) -> None:
    record = (await store.register(spec(), secret())).record
    results = await asyncio.gather(
        *(store.save_token("alpha", record.incarnation, 1, token(f"t{i}")) for i in range(20))
    )
    assert sorted(r.version for r in results if r is not None) == list(range(1, 21))


async def test_concurrent_registrations_never_lose_an_update(store: Store) -> None:
    await store.register(spec(), secret())
    results = await asyncio.gather(
        *(store.register(spec(scopes=(f"s{i}",)), None) for i in range(20))
    )
    assert sorted(r.record.revision for r in results) == list(range(2, 22))
    assert (await store.get_server("alpha")).revision == 21


async def test_concurrent_creations_make_one_server(store: Store) -> None:
    results = await asyncio.gather(*(store.register(spec("new"), secret()) for _ in range(10)))
    assert sum(r.changed for r in results) == 1
    assert {r.record.revision for r in results} == {1}


async def test_secrets_and_tokens_are_stored_only_as_ciphertext(store: Store) -> None:
    record = (await store.register(spec(), secret("plain-secret-xyz"))).record
    await store.save_token("alpha", record.incarnation, 1, token("plain-token-xyz"))
    async with store.engine.connect() as conn:
        rows = [
            *(await conn.execute(select(servers))).all(),
            *(await conn.execute(select(tokens))).all(),
            *(await conn.execute(select(audit_events))).all(),
        ]
    dump = repr(rows).encode()
    assert b"plain-secret-xyz" not in dump and b"plain-token-xyz" not in dump


async def test_a_new_server_s_first_token_request_reads_what_its_registration_wrote(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process writes a SQLite database: the registration's row is kept for
    the first token request. PostgreSQL replicas read it."""
    record = (await store.register(spec("alpha"), secret("a-secret"))).record
    transactions: list[object] = []
    run = store.transactions.run

    async def counted(work: Any) -> Any:
        transactions.append(work)
        return await run(work)

    monkeypatch.setattr(store.transactions, "run", counted)
    context = await store.load_for_fetch("alpha")
    assert context.record == record and context.credential.value.reveal() == "a-secret"
    assert context.token is None and context.previous is None
    assert len(transactions) == (1 if store.shared else 0)


async def test_a_credential_moved_to_another_row_fails_to_decrypt(store: Store) -> None:
    await store.register(spec("alpha"), secret("a-secret"))
    await store.register(spec("beta"), secret("b-secret"))
    async with store.engine.begin() as conn:
        alpha_ct = (
            await conn.execute(select(servers.c.credential_ct).where(servers.c.id == "alpha"))
        ).scalar_one()
        await conn.execute(
            update(servers).where(servers.c.id == "beta").values(credential_ct=alpha_ct)
        )
    store._contexts.forget(
        "beta"
    )  # what it kept from the registration: read the row, as after a restart
    with pytest.raises(DecryptionError):
        await store.load_for_fetch("beta")


async def test_rotate_keys_re_encrypts_everything_under_the_newest_key(
    store: Store, key_entry: str
) -> None:
    record = (await store.register(spec(), secret("keep-me"))).record
    await store.save_token("alpha", record.incarnation, 1, token("tok"))
    new_entry = generate_key_entry()
    store.keyring = KeyRing.parse(f"{key_entry}\n{new_entry}")
    assert await store.rotate_keys() == 2
    assert await store.key_ids_in_use() == {store.keyring.primary_id}
    store.keyring = KeyRing.parse(new_entry)  # the old key can now be dropped
    context = await store.load_for_fetch("alpha")
    assert context.credential.value.reveal() == "keep-me"
    assert context.token is not None and context.token.token.access_token == "tok"
    assert await store.rotate_keys() == 0


async def test_ciphertext_under_an_unconfigured_key_stops_the_start(store: Store) -> None:
    await store.register(spec(), secret())
    store.keyring = KeyRing.parse(generate_key_entry())
    with pytest.raises(ConfigurationError, match="not configured"):
        await store.check_keys()


async def test_every_admin_change_is_audited_without_secrets(store: Store) -> None:
    await store.register(spec(), secret("audit-secret"), actor="peer:a")
    await store.register(spec(scopes=("x",)), secret("audit-secret-2"), actor="peer:b")
    await store.delete("alpha", actor="peer:c")
    async with store.engine.connect() as conn:
        rows = (await conn.execute(select(audit_events).order_by(audit_events.c.id))).all()
    assert [(r.action, r.actor) for r in rows] == [
        ("create", "peer:a"),
        ("update", "peer:b"),
        ("delete", "peer:c"),
    ]
    assert '"credential"' in rows[1].detail and '"scopes"' in rows[1].detail
    assert "audit-secret" not in repr(rows)


async def test_listing_is_in_id_order_from_a_cursor(store: Store) -> None:
    for name in ("c", "a", "b", "d"):
        await store.register(spec(name), secret())
    assert [r.spec.id for r in await store.list_servers("", 2)] == ["a", "b"]
    assert [r.spec.id for r in await store.list_servers("b", 10)] == ["c", "d"]


async def test_what_a_refresh_reads_follows_every_write_of_the_server(store: Store) -> None:
    record = (await store.register(spec(), secret("old"))).record
    assert (await store.load_for_fetch("alpha")).token is None
    saved = await store.save_token("alpha", record.incarnation, 1, token())
    assert saved is not None
    loaded = await store.load_for_fetch("alpha")
    assert loaded.token == saved and loaded.record.status.token_version == saved.version
    await store.register(spec(), secret("new"))
    loaded = await store.load_for_fetch("alpha")
    assert loaded.credential.value.reveal() == "new"
    assert loaded.token is None and loaded.record.revision == 2
    # A token fetched under revision 1 is refused, and not kept either.
    assert await store.save_token("alpha", record.incarnation, 1, token()) is None
    assert (await store.load_for_fetch("alpha")).token is None


async def test_a_read_racing_a_registration_does_not_keep_the_old_row(store: Store) -> None:
    await store.register(spec(), secret("old"))
    reading = asyncio.ensure_future(store.load_for_fetch("alpha"))
    await asyncio.sleep(0)  # the read is handed to the database first
    await store.register(spec(), secret("new"))
    assert (await reading).credential.value.reveal() == "old"
    assert (await store.load_for_fetch("alpha")).credential.value.reveal() == "new"
