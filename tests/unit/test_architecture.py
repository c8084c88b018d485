"""The shape of the code, checked: no import circle, no module importing one above its layer, the guest
importing nothing of the host but the wire protocol, and every path under DHG_HOME built by Layout.

Imports are read from the source (``ast``), including the ones inside functions: a lazy import is
still a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dhg_kernel"
GUEST = ROOT / "guest"

# Lowest first. A module may import from its own layer and the ones below, never above.
LAYERS = [
    ("values", {"config", "errors", "protocol"}),
    ("utilities", {"tables", "tablefiles", "files", "instances", "watchdog", "guest_java", "pool"}),
    ("conversation", {"result", "client", "live"}),
    ("backends", {"vm", "vm.*"}),
    ("image build", {"prepare", "prepare.*"}),
    ("sessions", {"server", "session", "registry", "checkpoint", "weblinks", "exits", "status"}),
    ("front ends", {"display", "commands", "magic", "kernel", "kernelspec", "cluster", "provisioner", "local_provisioner", "cli", "__main__", "__init__"}),
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The dhg_kernel modules ``name`` imports (relative or absolute, at any depth of the file)."""
    here = name.split(".") if path.name == "__init__.py" and name != "__init__" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names if a.name.startswith("dhg_kernel.")]
            found.update(".".join(t) for t in targets)
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
            target = base + (node.module.split(".") if node.module else [])
        elif node.module and (node.module == "dhg_kernel" or node.module.startswith("dhg_kernel.")):
            target = node.module.split(".")[1:]
        else:
            continue
        for alias in node.names:
            sub = ".".join(target + [alias.name])
            if sub in MODULES:
                found.add(sub)
            elif ".".join(target) in MODULES:
                found.add(".".join(target))
            elif not target:
                found.add("__init__")
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if name == m or (m.endswith(".*") and name.startswith(m[:-1])):
                return i
    raise AssertionError(f"module {name} is in no layer: add it to LAYERS in {__file__}")


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_module_imports_one_above_its_layer():
    wrong = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
             for m, deps in GRAPH.items() for d in deps if _layer(d) > _layer(m)]
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_and_relative_imports():
    """The walk must see an import inside a function and a relative one (or the tests above prove nothing)."""
    assert "vm.qemu" in GRAPH["prepare.snapshot"]  # imported inside functions
    assert "vm.base" in GRAPH["vm.qemu"]  # from .base import …
    assert "magic" in GRAPH["__init__"]  # from .magic import load, inside a function


def test_the_guest_imports_only_the_wire_protocol_from_the_host():
    """The agent runs in the VM with only dhg_kernel/__init__.py and protocol.py beside it."""
    wrong = []
    for p in sorted(GUEST.glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                mod = node.module or ""
                if not (mod == "protocol" or (not mod and [a.name for a in node.names] == ["protocol"])):
                    wrong.append(f"{p.name}: from {'.' * node.level}{mod} import …")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                wrong += [f"{p.name}: import {n}" for n in names if n.startswith("dhg_kernel") and
                          n != "dhg_kernel.protocol"]
    assert not wrong, "\n".join(wrong)


def test_every_guest_module_goes_into_the_image():
    from dhg_kernel.prepare.image import guest_files

    shipped = {Path(k).name for k in guest_files() if k.startswith("lib/dhg_kernel/guest/")}
    assert shipped == {p.name for p in GUEST.glob("*.py")}
    assert {"init", "lib/dhg_kernel/protocol.py", "lib/dhg_kernel/__init__.py"} <= set(guest_files())


def test_only_layout_builds_paths_under_dhg_home():
    """Directory names of the DHG_HOME layout appear as path parts in config.py only."""
    parts = re.compile(r"""/\s*["'](vm|run|snapshots|rootfs|kernel|cache|firecracker)["']""")
    wrong = [f"{name}: {m.group(0)}" for name, path in MODULES.items() if name != "config"
             for m in parts.finditer(path.read_text())]
    assert not wrong, "\n".join(wrong)


def test_the_magic_the_kernel_and_the_cli_catch_no_bare_exception():
    """They catch the one root (DhvmError): anything else is a bug and must show as one."""
    wrong = []
    for name in ("magic", "kernel", "cli"):
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, ast.ExceptHandler) and isinstance(node.type, ast.Name) and \
                    node.type.id == "Exception":
                wrong.append(f"{name}.py line {node.lineno}")
    assert not wrong, wrong


def test_every_user_facing_error_derives_from_the_root():
    import inspect

    from dhg_kernel import errors
    from dhg_kernel.errors import DhvmError

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) > 10
    assert all(issubclass(c, DhvmError) for c in classes)
    # The ones other modules raise at users are these very classes.
    from dhg_kernel import files, guest_java
    from dhg_kernel.vm import base, fc_api, fc_release, netns, vsock

    assert files.FileLimitError is errors.FileLimitError and guest_java.JavaBuildError is errors.JavaBuildError
    assert base.BackendUnavailable is errors.BackendUnavailable and fc_api.FirecrackerAPIError is errors.FirecrackerAPIError
    assert fc_release.FirecrackerMissing is errors.FirecrackerMissing and netns.NetworkSetupError is errors.NetworkSetupError
    assert issubclass(vsock.VsockNotListening, errors.AgentStartError)


def test_python_m_dhg_kernel_is_the_dhvm_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dhg_kernel", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "prepare" in out.stdout and "kernel" in out.stdout, out.stderr


MAX_MODULE_LINES = 500


def test_no_module_is_over_the_line_limit():
    """A newcomer holds a module in their head: none of the host's or the guest's passes 500 lines."""
    long = {str(p.relative_to(ROOT)): n for p in [*PACKAGE.rglob("*.py"), *GUEST.rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"over {MAX_MODULE_LINES} lines: {long}"


# The host's request layer: only these modules name a protocol operation (as the guest's handler table
# in agent.py does on the other side).
REQUEST_LAYER = {"server", "client", "protocol"}


def _op_uses(tree: ast.AST) -> set[str]:
    """Names of protocol operations (``P.OP_X``, ``protocol.OP_X``, ``OP_X``) a module's code uses."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("OP_"):
            found.add(node.attr)
        elif isinstance(node, ast.Name) and node.id.startswith("OP_"):
            found.add(node.id)
        elif isinstance(node, ast.alias) and node.name.startswith("OP_"):
            found.add(node.name)
    return found


def test_only_the_request_layer_sends_requests():
    outside = {name: sorted(ops) for name, path in MODULES.items()
               if name not in REQUEST_LAYER and (ops := _op_uses(ast.parse(path.read_text())))}
    assert not outside, f"protocol operations used outside server.py/client.py: {outside}"
    assert _op_uses(ast.parse(MODULES["server"].read_text())), "server.py sends no request: is the checker blind?"


def _probes(tree: ast.AST) -> list[str]:
    """``getattr``/``hasattr`` calls on a name that holds a backend (``backend``, ``self.backend``…)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and node.args:
            target = ast.unparse(node.args[0])
            if re.search(r"(^|\.)_?backend$", target):
                out.append(ast.unparse(node))
    return out


def test_backends_are_used_through_their_declared_contract():
    """vm/base.py's Backend declares what a backend can do (can_checkpoint, can_fork, fork, start_from,
    snapshot, base_snapshot, why_not): nothing probes a backend for an attribute."""
    probes = {name: found for name, path in MODULES.items() if (found := _probes(ast.parse(path.read_text())))}
    assert not probes, probes
    assert _probes(ast.parse("getattr(self.backend, 'fork', None)")), "the checker is blind"
    from dhg_kernel.vm.base import Backend

    for attr in ("can_checkpoint", "can_fork", "fork", "start_from", "snapshot", "base_snapshot", "why_not",
                 "checkpoint", "no_checkpoints", "describe"):
        assert hasattr(Backend, attr), f"vm/base.py's Backend does not declare {attr}"


def test_the_session_only_runs_servers():
    """Session keeps which server, mode and pool, lifecycle, replacing a lost server, running a cell, and
    status: at most 350 lines (requests are server.py's, checkpoints checkpoint.py's, links weblinks.py's)."""
    tree = ast.parse(MODULES["session"].read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Session"]
    assert cls.end_lineno - cls.lineno + 1 <= 350, f"Session is {cls.end_lineno - cls.lineno + 1} lines"


def test_line_commands_are_dispatched_through_one_table():
    """``%dhvm NAME`` finds its handler in commands.COMMANDS: no module compares a word with a command's
    name (the 14-way if chain this replaced), and every command in the table has a handler and a usage."""
    from dhg_kernel.commands import COMMANDS

    chains = []
    for name in ("magic", "commands", "kernel"):
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in COMMANDS
                                                     for c in [node.left, *node.comparators]):
                chains.append(f"{name}: {ast.unparse(node)}")
    assert not chains, chains
    assert len(COMMANDS) >= 15 and all(callable(c.run) and c.does for c in COMMANDS.values())
