"""Firecracker's REST API over its unix socket: thin resource objects, checked against the spec.

Every request body is validated at the boundary, before it is sent, against the OpenAPI (swagger
2.0) definitions of the Firecracker release in use — the way Firecracker's own Python test
framework does it. The definitions are turned into JSON Schema and made strict
(``additionalProperties: false``), because Firecracker's server rejects unknown fields with a 400.
Fields that a Firecracker version does not know yet (``FIELD_SINCE``) are refused here too, so a
body built for 1.16 is never sent to 1.10.

A reply with an error (``{"fault_message": …}``) becomes a ``FirecrackerAPIError`` that says what
was asked, what Firecracker answered and, where the cause is known, what to do.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FirecrackerAPIError

# The release this build pins and has checked its bodies against.
DEFAULT_VERSION = "1.16.1"
# ACPI (1.8) is what lets the Debian kernel find virtio-mmio devices without
# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, which it lacks.
MIN_VERSION = (1, 8)
# (definition, field) -> first Firecracker version whose API accepts it (older ones answer 400).
FIELD_SINCE: dict[tuple[str, str], tuple[int, int]] = {
    ("SnapshotLoadParams", "network_overrides"): (1, 12),
    ("SnapshotLoadParams", "track_dirty_pages"): (1, 13),
    ("SnapshotLoadParams", "vsock_override"): (1, 16),
    ("SnapshotLoadParams", "clock_realtime"): (1, 16),
}
# How long to wait for a fresh Firecracker process to create its API socket.
API_SOCKET_TIMEOUT_S = 10.0
# A single API call; snapshot create/load of a few GB can take this long on a slow disk.
API_CALL_TIMEOUT_S = 300.0


Version = tuple[int, int, int]


def parse_version(text: str) -> Version:
    """``v1.16.1`` / ``1.16.1`` / ``Firecracker v1.16.1-dev`` -> (1, 16, 1)."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise ValueError(f"not a Firecracker version: {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def version_str(v: Version) -> str:
    return ".".join(map(str, v))


def supports(version: Version, definition: str, field: str) -> bool:
    """True when Firecracker ``version`` accepts ``field`` in a ``definition`` body."""
    since = FIELD_SINCE.get((definition, field))
    return since is None or version[:2] >= since


class SpecError(ValueError):
    """A request body that the Firecracker API would reject: caught before it is sent."""


# Known fault messages (substring, lower case) -> what the user can do about it.
FAULT_HINTS: tuple[tuple[str, str], ...] = (
    ("snapshot", "the snapshot may come from another Firecracker version or be damaged — "
                 "run: dhvm prepare --backend firecracker --rebuild"),
    ("kvm", "Firecracker needs read/write access to a working /dev/kvm — check `ls -l /dev/kvm` and that "
            "virtualization is enabled (nested virtualization on a cloud VM)"),
    ("address in use", "another process holds the instance's socket; run: dhvm reap"),
    ("permission denied", "Firecracker cannot open a file it was given; check the permissions of DHG_HOME/vm"),
    ("no such file", "a file Firecracker was given is missing — run: dhvm prepare --backend firecracker"),
    ("tap", "the TAP device is missing or busy; networking needs root (CAP_NET_ADMIN)"),
)


def fault_hint(fault: str) -> str:
    low = fault.lower()
    for needle, hint in FAULT_HINTS:
        if needle in low:
            return hint
    return ""


# -- the spec --------------------------------------------------------------------------------------


@dataclass
class Spec:
    """The definitions of one Firecracker API spec as strict JSON Schema."""

    version: Version
    definitions: dict[str, Any]
    source: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Spec":
        """Read a ``firecracker_spec-vX.Y.Z.yaml`` (swagger 2.0)."""
        return _load_spec(str(Path(path).resolve()))

    def for_version(self, version: Version) -> "Spec":
        """This spec with the fields that ``version`` does not know yet removed (so they are rejected)."""
        defs = copy.deepcopy(self.definitions)
        for (name, field), since in FIELD_SINCE.items():
            if version[:2] < since and name in defs:
                defs[name].get("properties", {}).pop(field, None)
                if field in defs[name].get("required", []):
                    defs[name]["required"].remove(field)
        return Spec(version, defs, f"{self.source} (as of {version_str(version)})")

    def validate(self, definition: str, body: Any) -> None:
        """Raise SpecError unless ``body`` matches ``definition``."""
        import jsonschema

        if definition not in self.definitions:
            raise SpecError(f"the Firecracker {version_str(self.version)} spec has no definition {definition!r}")
        schema = {"$ref": f"#/definitions/{definition}", "definitions": self.definitions}
        errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(body), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            where = "/".join(map(str, e.path)) or "(body)"
            raise SpecError(f"{definition} body rejected by the Firecracker {version_str(self.version)} spec at "
                            f"{where}: {e.message}")


@functools.lru_cache(maxsize=8)
def _load_spec(path: str) -> Spec:
    import yaml

    with open(path) as fh:
        doc = yaml.safe_load(fh)
    defs = {name: _strict(d) for name, d in (doc.get("definitions") or {}).items()}
    return Spec(parse_version(str(doc.get("info", {}).get("version", "0.0.0"))), defs, path)


def _strict(schema: Any) -> Any:
    """Swagger definitions -> JSON Schema draft 4 that, like Firecracker, rejects unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items() if k not in ("example", "readOnly", "x-nullable")}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        if "$ref" in out:  # draft 4 ignores siblings of $ref; keep only the reference
            return {"$ref": out["$ref"]}
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def spec_beside(binary: str | os.PathLike | None) -> Path | None:
    """The release's own ``firecracker_spec-v*.yaml`` next to the binary, if it was kept there."""
    if not binary:
        return None
    found = sorted(Path(binary).resolve().parent.glob("firecracker_spec-v*.yaml"))
    return found[-1] if found else None


# -- the client ------------------------------------------------------------------------------------


class Resource:
    """One REST path of the API: its methods take a body, validate it and send it."""

    def __init__(self, api: "FirecrackerAPI", path: str, definition: str | None, patch_definition: str | None = None):
        self.api = api
        self.path = path
        self.definition = definition
        self.patch_definition = patch_definition

    def put(self, **body: Any) -> dict | None:
        return self.api.request("PUT", self.path, self._checked(self.definition, body))

    def patch(self, **body: Any) -> dict | None:
        return self.api.request("PATCH", self.path, self._checked(self.patch_definition or self.definition, body))

    def get(self) -> dict | None:
        return self.api.request("GET", self.path, None)

    def _checked(self, definition: str | None, body: dict) -> dict:
        body = {k: v for k, v in body.items() if v is not None}
        if definition:
            self.api.check(definition, body)
        return body


class FirecrackerAPI:
    """The API of one Firecracker process, reached through its unix socket.

    ``version`` gates fields (``FIELD_SINCE``); ``spec`` (optional) validates every body. ``calls``
    records (method, path, body) of every request sent, for logs and tests.
    """

    def __init__(self, socket_path: str | os.PathLike, version: Version, spec: Spec | None = None,
                 timeout: float = API_CALL_TIMEOUT_S):
        import requests_unixsocket

        self.socket_path = Path(socket_path)
        self.version = version
        self.spec = spec
        self.timeout = timeout
        self.calls: list[tuple[str, str, dict | None]] = []
        self._dirfd: int | None = None
        target = str(self.socket_path)
        if len(target) > 100:
            # Past the 108-byte sun_path limit: reach the socket through an open handle on its directory.
            self._dirfd = os.open(self.socket_path.parent, os.O_PATH | os.O_DIRECTORY)
            target = f"/proc/self/fd/{self._dirfd}/{self.socket_path.name}"
        self.base = "http+unix://" + urllib.parse.quote(target, safe="")
        self.session = requests_unixsocket.Session()
        # Resources (one per REST path), named as in the spec.
        self.root = Resource(self, "/", None)
        self.version_info = Resource(self, "/version", None)
        self.actions = Resource(self, "/actions", "InstanceActionInfo")
        self.boot = Resource(self, "/boot-source", "BootSource")
        self.machine_config = Resource(self, "/machine-config", "MachineConfiguration")
        self.logger = Resource(self, "/logger", "Logger")
        self.entropy = Resource(self, "/entropy", "EntropyDevice")
        self.vsock = Resource(self, "/vsock", "Vsock")
        self.vm = Resource(self, "/vm", "Vm")
        self.snapshot_create = Resource(self, "/snapshot/create", "SnapshotCreateParams")
        self.snapshot_load = Resource(self, "/snapshot/load", "SnapshotLoadParams")

    def drive(self, drive_id: str) -> Resource:
        return Resource(self, f"/drives/{drive_id}", "Drive", "PartialDrive")

    def network_interface(self, iface_id: str) -> Resource:
        return Resource(self, f"/network-interfaces/{iface_id}", "NetworkInterface", "PartialNetworkInterface")

    def check(self, definition: str, body: dict) -> None:
        """Refuse fields newer than this Firecracker, then validate against the spec (if known)."""
        _check_fields_known(self.version, definition, body)
        if self.spec is not None:
            self.spec.validate(definition, body)

    def request(self, method: str, path: str, body: dict | None) -> dict | None:
        """Send one request; an error reply raises FirecrackerAPIError with Firecracker's fault_message."""
        import requests

        self.calls.append((method, path, body))
        try:
            r = self.session.request(method, self.base + path, json=body, timeout=self.timeout,
                                     headers={"Accept": "application/json"})
        except requests.ConnectionError as e:
            raise FirecrackerAPIError(method, path, 0, f"no answer on the API socket {self.socket_path} ({e})",
                                      "Firecracker exited or never started; see the instance's agent.log") from None
        finally:
            # One connection per request, closed here. requests_unixsocket keeps a pool per URL, so every
            # API path would keep a connection open, and Firecracker's API server answers the 11th open
            # connection "503 Too many open connections": the real v1.12.1 refused the snapshot create
            # after a cold boot's eight calls that way.
            self.session.close()
        if r.status_code >= 300:
            try:
                fault = r.json().get("fault_message") or r.text
            except ValueError:
                fault = r.text or r.reason
            raise FirecrackerAPIError(method, path, r.status_code, fault, fault_hint(fault))
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    def wait_ready(self, timeout: float = API_SOCKET_TIMEOUT_S, is_alive=lambda: True) -> None:
        """Wait until the process answers on its API socket."""
        deadline = time.monotonic() + timeout
        while True:
            if self.socket_path.exists():
                try:
                    self.request("GET", "/", None)
                    self.calls.pop()  # readiness polling is not part of the call sequence
                    return
                except FirecrackerAPIError:
                    self.calls.pop()
            if not is_alive():
                raise FirecrackerAPIError("GET", "/", 0, "Firecracker exited before it opened its API socket",
                                          "see the instance's agent.log for Firecracker's own message")
            if time.monotonic() >= deadline:
                raise FirecrackerAPIError("GET", "/", 0, f"no API socket at {self.socket_path} after {timeout:.0f}s",
                                          "see the instance's agent.log")
            time.sleep(0.005)

    def close(self) -> None:
        self.session.close()
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None


def _check_fields_known(version: Version, definition: str, body: Any) -> None:
    if not isinstance(body, dict):
        return
    for field in body:
        if not supports(version, definition, field):
            since = version_str(FIELD_SINCE[(definition, field)] + (0,))
            raise SpecError(f"{definition}.{field} needs Firecracker ≥ {since}; this one is {version_str(version)}")


def dumps_calls(calls: list[tuple[str, str, dict | None]]) -> str:
    """The call log as text (one JSON line per call) for prepare.log."""
    return "\n".join(json.dumps({"method": m, "path": p, "body": b}) for m, p, b in calls)
