"""Where the guest's sources are on the host, and the agent's own Java classes (``guest/java``): compiled
once, put on the Deephaven JVM's classpath.

``dhg.TokenAuthHandler`` gives every instance its own login key (set after each restore, never in
the snapshot); ``dhg.Reseed`` gives every clone fresh Java random state. They are compiled with
the host's Java (``java -m jdk.compiler``, so a JRE with the compiler module is enough) against
the Deephaven jars they will run with: into the image for VMs, into a cache under DHG_HOME for the
local backend.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from .errors import BackendUnavailable, JavaBuildError

SOURCES = ("TokenAuthHandler.java", "Reseed.java")
# The jars the sources compile against (names without the version suffix).
COMPILE_JARS = ("deephaven-authentication", "deephaven-Base")
# Deephaven's auth handler setting for the agent's JVM.
AUTH_HANDLER = "dhg.TokenAuthHandler"
# What Reseed reaches into (reflection on JDK internals).
JVM_OPENS = ("java.base/java.lang", "java.base/java.util", "java.base/java.util.concurrent")


def guest_dir() -> Path:
    """The guest package's directory (``guest/``, packaged as ``dhg_kernel.guest``): the agent's modules,
    its Java sources (``java/``) and the VM's init."""
    spec = importlib.util.find_spec("dhg_kernel.guest")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable("the guest agent (dhg_kernel.guest) is missing from this install; "
                                 "reinstall: pip install -e '.[local]'")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def source_dir() -> Path:
    """``guest/java`` (packaged as ``dhg_kernel/guest/java``)."""
    return guest_dir() / "java"


def source_files() -> list[Path]:
    return [source_dir() / "dhg" / name for name in SOURCES]


def sources_digest() -> str:
    h = hashlib.sha256()
    for p in source_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def java_binary() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and os.access(os.path.join(home, "bin", "java"), os.X_OK):
        return os.path.join(home, "bin", "java")
    return shutil.which("java")


def compile_classes(jars_dir: Path, dest: Path) -> Path:
    """Compile the sources against the jars in ``jars_dir`` into ``dest`` (replaced atomically)."""
    java = java_binary()
    if java is None:
        raise JavaBuildError("no java found to compile the agent's classes. Run: apt-get install openjdk-17-jre-headless")
    jars = []
    for stem in COMPILE_JARS:
        found = sorted(Path(jars_dir).glob(f"{stem}-[0-9]*.jar"))
        if not found:
            raise JavaBuildError(f"{stem}-*.jar not found in {jars_dir}: is deephaven-server installed there?")
        jars.append(str(found[-1]))
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [java, "-m", "jdk.compiler/com.sun.tools.javac.Main", "--release", "17", "-nowarn",
           "-d", str(tmp), "-cp", os.pathsep.join(jars), *map(str, source_files())]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise JavaBuildError(f"compiling the agent's Java classes failed ({' '.join(cmd[:3])}):\n{p.stderr.strip()}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def local_classes(cache: Path) -> Path:
    """The classes for agents that run on the host, compiled once per source version."""
    import deephaven_server

    jars = Path(deephaven_server.__file__).parent / "jars"
    dest = cache / f"classes-{sources_digest()}"
    if not (dest / "dhg" / "TokenAuthHandler.class").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        compile_classes(jars, dest)
    return dest
