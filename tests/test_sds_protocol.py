"""The SDS protocol state of one stream, without gRPC: versions, nonces,
ACK/NACK, stale requests, reconnects, expiry and fail-closed secrets."""

from __future__ import annotations

from datetime import timedelta

from tokensvc.events import ServerRemoved, TokenIssued, TokenRevoked
from tokensvc.sds import Consumers, DeltaStream, Node, Request, Secrets, SotwStream
from tokensvc.token import ServerToken, Token
from tokensvc.watch import Synced

from support import FakeClock

NODE = Node("gateway-1", "gateway")


def issued(clock: FakeClock, server_id: str, version: int, revision: int = 1) -> TokenIssued:
    token = Token(f"tok-{server_id}-{version}", "Bearer", clock(), clock() + timedelta(seconds=60))
    return TokenIssued(ServerToken(server_id, token, version, revision))


def streams(clock: FakeClock, allow: object = None) -> tuple[Consumers, SotwStream, DeltaStream]:
    consumers = Consumers(clock)
    allowed = (lambda s: True) if allow is None else allow
    return (
        consumers,
        SotwStream(consumers, Secrets(allowed, clock)),  # type: ignore[arg-type]
        DeltaStream(consumers, Secrets(allowed, clock)),  # type: ignore[arg-type]
    )


def test_sotw_answers_after_synced_acks_are_recorded_and_unchanged_is_never_resent() -> None:
    clock = FakeClock()
    consumers, sotw, _ = streams(clock)
    sotw.request(Request(node=NODE, resource_names=("weather",)))
    assert sotw.response() is None  # not synced yet: an empty secret now would be a lie
    sotw.secrets.apply(issued(clock, "weather", 1))
    sotw.secrets.apply(Synced())
    first = sotw.response()
    assert first is not None and first.version_info == "r1v1"
    assert first.resources[0].header_value == "Bearer tok-weather-1"
    assert [t.version for t in first.issued] == [1]
    assert sotw.response() is None  # nothing changed
    sotw.request(
        Request(version_info="r1v1", resource_names=("weather",), response_nonce=first.nonce)
    )
    [held] = consumers.of("weather")
    assert (held.node, held.acked_version, held.acked_at) == (NODE, "r1v1", clock())
    sotw.secrets.apply(issued(clock, "weather", 2))
    second = sotw.response()
    assert second is not None and second.version_info == "r1v2" and second.nonce != first.nonce


def test_a_nack_is_recorded_and_a_request_with_an_old_nonce_is_ignored() -> None:
    clock = FakeClock()
    consumers, sotw, _ = streams(clock)
    sotw.secrets.apply(issued(clock, "weather", 1))
    sotw.secrets.apply(Synced())
    sotw.request(Request(node=NODE, resource_names=("weather",)))
    first = sotw.response()
    assert first is not None
    sotw.secrets.apply(issued(clock, "weather", 2))
    second = sotw.response()
    assert second is not None
    # An ACK of the first response arrives late: it says nothing about the second.
    sotw.request(Request(version_info="r1v1", resource_names=(), response_nonce=first.nonce))
    assert consumers.of("weather") == [] and sotw.names == ("weather",)
    sotw.request(
        Request(
            version_info="r1v1",
            resource_names=("weather",),
            response_nonce=second.nonce,
            error="bad secret 'tok-weather-2'",  # a node may quote what it rejected
        )
    )
    [held] = consumers.of("weather")
    assert held.nack_error == "bad secret '[token]'" and held.acked_version == ""
    assert sotw.response() is None  # a NACK is not answered with the same again


def test_a_reconnecting_node_that_holds_the_current_version_gets_nothing_new() -> None:
    clock = FakeClock()
    consumers, sotw, _ = streams(clock)
    sotw.secrets.apply(issued(clock, "weather", 3))
    sotw.secrets.apply(Synced())
    sotw.request(Request(node=NODE, version_info="r1v3", resource_names=("weather",)))
    assert sotw.response() is None
    assert consumers.of("weather")[0].acked_version == "r1v3"
    _, other, _ = streams(clock)
    other.secrets.apply(issued(clock, "weather", 4))
    other.secrets.apply(Synced())
    other.request(Request(node=NODE, version_info="r1v3", resource_names=("weather",)))
    response = other.response()
    assert response is not None and response.version_info == "r1v4"


def test_secrets_fail_closed_on_delete_change_expiry_and_for_names_not_allowed() -> None:
    clock = FakeClock()
    _, sotw, _ = streams(clock, allow=lambda s: s != "team-b-x")
    for server_id in ("a", "b", "c", "team-b-x"):
        sotw.secrets.apply(issued(clock, server_id, 1))
    sotw.secrets.apply(Synced())
    sotw.request(Request(node=NODE, resource_names=("a", "b", "c", "unknown")))
    response = sotw.response()
    assert response is not None
    assert [(r.name, bool(r.header_value)) for r in response.resources] == [
        ("a", True),
        ("b", True),
        ("c", True),
        ("unknown", False),
    ]
    sotw.secrets.apply(ServerRemoved("a"))
    sotw.secrets.apply(TokenRevoked("b", 2))
    response = sotw.response()
    assert response is not None and response.version_info == "empty,empty,r1v1,empty"
    assert sotw.secrets.next_expiry(("c",)) == clock() + timedelta(seconds=60)
    clock.advance(60)
    response = sotw.response()
    assert response is not None and response.version_info == "empty,empty,empty,empty"
    assert all(r.header_value == "" for r in response.resources)
    assert sotw.secrets.next_expiry(("c",)) is None
    # A name the caller may not have is never served, even when it has a token.
    sotw.request(
        Request(resource_names=("team-b-x",), response_nonce=response.nonce, version_info="")
    )
    response = sotw.response()
    assert response is not None and response.resources[0].header_value == ""


def test_delta_sends_changes_empties_and_honours_initial_versions() -> None:
    clock = FakeClock()
    consumers, _, delta = streams(clock)
    delta.secrets.apply(issued(clock, "a", 1))
    delta.secrets.apply(issued(clock, "b", 5))
    delta.secrets.apply(Synced())
    # A reconnecting node that already holds b's current version.
    delta.request(Request(node=NODE, resource_names=("a", "b"), initial_versions={"b": "r1v5"}))
    first = delta.response()
    assert first is not None and [r.name for r in first.resources] == ["a"]
    delta.request(Request(response_nonce=first.nonce))
    assert [c.acked_version for c in consumers.of("a")] == ["r1v1"]
    delta.secrets.apply(ServerRemoved("b"))
    emptied = delta.response()
    # An empty secret, not a removal: Envoy ignores SDS removals and keeps the old token.
    assert emptied is not None
    assert [(r.name, r.version, r.header_value) for r in emptied.resources] == [("b", "empty", "")]
    delta.request(Request(unsubscribe=("a",), response_nonce=emptied.nonce))
    assert consumers.of("a") == []
    delta.secrets.apply(issued(clock, "a", 2))
    assert delta.response() is None  # unsubscribed
    delta.request(Request(resource_names=("a",), response_nonce=emptied.nonce))
    again = delta.response()
    assert again is not None and [(r.name, r.version) for r in again.resources] == [("a", "r1v2")]
