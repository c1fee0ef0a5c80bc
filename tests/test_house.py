"""The size limits of the house: modules of one job stay small enough to read.

No module of tokensvc over 450 lines, no class over 300, no RPC method of a
servicer over 30 (the generated stubs in tokensvc/v1 aside). And the tests
have one of each helper: those of support.py and replicas.py are not written
again in a test module, and one fixture starts the authorization server.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tokensvc"
TESTS = Path(__file__).resolve().parent
SHARED = ("support.py", "replicas.py")  # the tests' helpers: in-process, and replicas
MAX_MODULE, MAX_CLASS, MAX_RPC = 450, 300, 30


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "v1" not in p.relative_to(PACKAGE).parts)


def length(node: ast.AST) -> int:
    end = getattr(node, "end_lineno", None)
    assert end is not None
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])  # type: ignore[attr-defined]
    return int(end) - first + 1


def is_servicer(node: ast.ClassDef) -> bool:
    return any(
        isinstance(base, ast.Attribute) and base.attr.endswith("Servicer") for base in node.bases
    )


def test_no_module_is_over_the_limit() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE
    }
    assert not long, f"modules over {MAX_MODULE} lines: {long}"


def test_no_class_and_no_rpc_method_is_over_the_limit() -> None:
    classes, methods = {}, {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            where = f"{path.relative_to(PACKAGE)}:{node.name}"
            if length(node) > MAX_CLASS:
                classes[where] = length(node)
            if not is_servicer(node):
                continue
            for item in node.body:
                rpc = isinstance(item, ast.AsyncFunctionDef | ast.FunctionDef)
                if rpc and item.name[:1].isupper() and length(item) > MAX_RPC:
                    methods[f"{where}.{item.name}"] = length(item)
    assert not classes, f"classes over {MAX_CLASS} lines: {classes}"
    assert not methods, f"servicer RPC methods over {MAX_RPC} lines: {methods}"


def test_the_limits_see_the_servicers() -> None:
    """The check would pass vacuously if it found no servicer."""
    found = {
        node.name
        for path in modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and is_servicer(node)
    }
    assert {"AdminServicer", "TokenServicer", "SecretDiscoveryServicer"} <= found


def test_settings_is_the_one_reader_of_the_environment() -> None:
    readers = [
        str(p.relative_to(PACKAGE))
        for p in modules()
        if ("os.environ" in (text := p.read_text()) or "getenv(" in text)
        and p.relative_to(PACKAGE).parts[0] not in ("settings.py", "bench")
    ]
    assert readers == []


def imported(path: Path) -> set[str]:
    """The top-level packages ``path`` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_egress_is_the_one_importer_of_httpx2_in_the_service() -> None:
    """Every outbound request of the service goes through the egress policy;
    the broker client, the demo and the benchmark are not the service."""
    importers = {
        p.relative_to(PACKAGE).parts[0]
        for p in modules()
        if "httpx2" in imported(p)
        and p.relative_to(PACKAGE).parts[0] not in ("client", "demo", "bench")
    }
    assert importers == {"egress"}


def wire_errors() -> set[tuple[str, str]]:
    """(status, reason) of every error a caller can receive."""
    from tokensvc import errors

    pairs, pending = set(), [errors.TokenSvcError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls in (errors.FetchError, errors.TransientFetchError):
            continue  # bases: a caller receives one of their subclasses
        code = errors.grpc_status_of(cls.__new__(cls))
        if code.name != "INTERNAL":
            pairs.add((code.name, cls.reason))
    return pairs


def test_the_error_reasons_agree_in_the_code_the_proto_and_the_readme() -> None:
    root = PACKAGE.parent
    proto = (root / "protos/tokensvc/v1/tokensvc.proto").read_text()
    readme = (root / "README.md").read_text()
    in_proto = set(re.findall(r"^//   ([A-Z_]+) +([A-Z_]+) ", proto, re.M))
    in_readme = set(re.findall(r"^\| `([A-Z_]+)` \| `([A-Z_]+)` \|", readme, re.M))
    expected = wire_errors()
    assert ("ABORTED", "REGISTRATION_CHANGED") in expected  # the walk finds them
    assert in_proto == expected
    assert in_readme == expected


# --- the tests' helpers: one of each ------------------------------------------------


def suite_modules() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "node_modules" not in p.parts)


def definitions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    """The functions and classes a module defines at its top level."""
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return [node for node in ast.parse(path.read_text()).body if isinstance(node, kinds)]


def is_fixture(node: ast.AST) -> bool:
    decorators = [ast.unparse(d) for d in getattr(node, "decorator_list", [])]
    return any(d == "pytest.fixture" or d.startswith("pytest.fixture(") for d in decorators)


def test_no_test_module_writes_a_shared_helper_again() -> None:
    """A fixture may override one of support's by name (pytest's own way to
    change it for a module); any other function or class of the same name as
    one of support.py or replicas.py is a fork."""
    shared: dict[str, list[str]] = {}
    for name in SHARED:
        for node in definitions(TESTS / name):
            shared.setdefault(node.name, []).append(name)
    assert {"Watcher", "register", "eventually", "FakeClock", "auth"} <= set(shared)
    twice = {name: where for name, where in shared.items() if len(where) > 1}
    assert not twice, f"in both shared modules: {twice}"
    forks = [
        f"{path.relative_to(TESTS)}:{node.name}"
        for path in suite_modules()
        if path.name not in SHARED
        for node in definitions(path)
        if node.name in shared and not is_fixture(node)
    ]
    assert not forks, f"written again (use the one in {SHARED}): {forks}"


def test_one_fixture_starts_the_authorization_server() -> None:
    """Others take ``auth`` and add clients or behaviour to it; a test may still
    start a second server of its own (another issuer, a restart)."""
    starters = [
        f"{path.relative_to(TESTS)}:{node.name}"
        for path in suite_modules()
        for node in definitions(path)
        if is_fixture(node)
        and any(
            isinstance(call, ast.Call) and ast.unparse(call.func) == "AuthServer"
            for call in ast.walk(node)
        )
    ]
    assert starters == ["support.py:auth"]
