"""Install what a node runs: mosquitto from apt, kubo built from source with Go, and the
broker's auth plugin built from IPDC's own C source with gcc.

No registry reachable from a typical lab network ships a kubo binary, so kubo is
built from the Go module proxy at a pinned version. An existing binary (on PATH,
in ``$GOPATH/bin``, or named by ``$IPDC_KUBO_BIN``) is reused: the first build
takes minutes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from importlib.resources import files
from pathlib import Path

from ipdc.errors import InstallError

log = logging.getLogger(__name__)

KUBO_VERSION = "v0.39.0"
#: kubo 0.39's dependency github.com/cockroachdb/swiss does not build with Go >= 1.26;
#: the go command fetches this toolchain from the module proxy when the local one differs.
GO_TOOLCHAIN = "go1.25.5"
MIN_KUBO = (0, 37)


def _gopath_bin() -> Path | None:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        return None
    out = subprocess.run([go, "env", "GOPATH"], capture_output=True, text=True, check=False)
    return Path(out.stdout.strip().split(os.pathsep)[0]) / "bin" if out.returncode == 0 else None


def kubo_version(binary: Path) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([str(binary), "version", "--number"], capture_output=True, text=True,
                             timeout=30, check=False)
    except OSError:
        return None
    try:
        return tuple(int(x) for x in out.stdout.strip().split("-")[0].split("."))
    except ValueError:
        return None


def find_kubo() -> Path | None:
    """An installed kubo recent enough for IPDC's config (AutoConf needs >= 0.37)."""
    candidates = [os.environ.get("IPDC_KUBO_BIN"), shutil.which("ipfs")]
    if (gobin := _gopath_bin()) is not None:
        candidates.append(str(gobin / "ipfs"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            version = kubo_version(Path(candidate))
            if version is not None and version[:2] >= MIN_KUBO:
                return Path(candidate)
            log.warning("ignoring %s: kubo %s is older than %d.%d", candidate, version, *MIN_KUBO)
    return None


def build_kubo() -> Path:
    """``go install`` kubo at the pinned version; if the go command refuses the
    module (replace/exclude directives, or a proxy that hides the version list),
    download it and ``go build`` inside the module directory."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    gobin = _gopath_bin()
    if not Path(go).exists() or gobin is None:
        raise InstallError("kubo is not installed and Go is missing: install Go (https://go.dev/doc/install) "
                           "or put a kubo >= 0.37 binary on PATH")
    env = {**os.environ, "GOTOOLCHAIN": GO_TOOLCHAIN, "GOFLAGS": "-trimpath"}
    log.warning("building kubo %s with Go; the first build takes several minutes", KUBO_VERSION)
    module = f"github.com/ipfs/kubo/cmd/ipfs@{KUBO_VERSION}"
    first = subprocess.run([go, "install", module], env=env, capture_output=True, text=True, check=False)
    if first.returncode == 0 and (gobin / "ipfs").exists():
        return gobin / "ipfs"
    log.info("go install refused the module (%s); building from the module directory",
             first.stderr.strip().splitlines()[-1:] or "no message")
    dl = subprocess.run([go, "mod", "download", "-json", f"github.com/ipfs/kubo@{KUBO_VERSION}"],
                        env=env, capture_output=True, text=True, check=False)
    try:
        module_dir = json.loads(dl.stdout)["Dir"]
    except (ValueError, KeyError):
        raise InstallError(f"cannot download kubo {KUBO_VERSION}: {dl.stdout}{dl.stderr}") from None
    gobin.mkdir(parents=True, exist_ok=True)
    build = subprocess.run([go, "build", "-o", str(gobin / "ipfs"), "./cmd/ipfs"], cwd=module_dir,
                           env=env, capture_output=True, text=True, check=False)
    if build.returncode != 0:
        raise InstallError(f"building kubo {KUBO_VERSION} failed:\n{build.stderr[-3000:]}")
    return gobin / "ipfs"


def ensure_kubo() -> Path:
    found = find_kubo()
    if found is not None:
        log.info("reusing kubo at %s", found)
        return found
    return build_kubo()


def find_mosquitto() -> Path | None:
    """The mosquitto binary, looking in sbin too: Debian puts the broker there."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/local/sbin"
    found = shutil.which("mosquitto", path=path)
    return Path(found) if found else None


#: What building the broker's auth plugin needs: Debian package -> a file it provides.
PLUGIN_BUILD_DEPS = {
    "gcc": None,  # found on PATH
    "libc6-dev": "/usr/include/stdio.h",  # only recommended by gcc, so missing on slim systems
    "mosquitto-dev": "/usr/include/mosquitto_broker.h",
    "libmosquitto-dev": "/usr/include/mosquitto.h",
    "libssl-dev": "/usr/include/openssl/x509.h",
}
PLUGIN_SOURCE = "broker_plugin/ipdc_auth.c"
PLUGIN_FLAGS = ["-std=gnu99", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra"]


def _missing_build_deps() -> list[str]:
    return [package for package, probe in PLUGIN_BUILD_DEPS.items()
            if (shutil.which(package) is None if probe is None else not Path(probe).exists())]


def install_packages(packages: list[str]) -> None:
    """apt-get install ``packages`` as root; otherwise an error that names them."""
    if not packages:
        return
    if os.geteuid() != 0:
        raise InstallError(f"this needs the Debian packages {', '.join(packages)}: run `sudo apt-get install "
                           f"{' '.join(packages)}`, then run the same command again")
    log.warning("installing %s with apt-get", " ".join(packages))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise InstallError(f"`{' '.join(argv)}` failed:\n{done.stderr[-2000:]}")


def ensure_mosquitto(build_deps: bool = False) -> Path:
    """mosquitto (the broker host only), and with ``build_deps`` what building its auth
    plugin needs: installed with apt-get as root, named in an error otherwise."""
    install_packages(([] if find_mosquitto() else ["mosquitto"]) + (_missing_build_deps() if build_deps else []))
    found = find_mosquitto()
    if found is None:
        raise InstallError("apt-get installed mosquitto, but its binary is not on PATH or in /usr/sbin")
    return found


def ensure_bubblewrap() -> Path:
    """bwrap, which every sandbox of user code starts with."""
    if shutil.which("bwrap") is None:
        install_packages(["bubblewrap"])
    found = shutil.which("bwrap")
    if found is None:
        raise InstallError("apt-get installed bubblewrap, but bwrap is not on PATH")
    return Path(found)


def plugin_cache() -> Path:
    """Built plugins are shared by every node home of this user: ``$XDG_CACHE_HOME/ipdc``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ipdc"


def ensure_plugin() -> Path:
    """The broker's auth plugin (``ipdc_auth.so``), built from the shipped source with gcc
    the first time and reused after: its file name carries a hash of the source and flags,
    so a changed source is built again and an old build is never loaded."""
    source = (files("ipdc.node") / PLUGIN_SOURCE).read_bytes()
    tag = hashlib.sha256(source + " ".join(PLUGIN_FLAGS).encode()).hexdigest()[:16]
    target = plugin_cache() / f"ipdc_auth-{tag}.so"
    ensure_mosquitto(build_deps=not target.exists())
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix="ipdc-plugin-", dir=target.parent))
    try:
        (build_dir / "ipdc_auth.c").write_bytes(source)
        done = subprocess.run(["gcc", *PLUGIN_FLAGS, "-o", "ipdc_auth.so", "ipdc_auth.c", "-lcrypto"],
                              cwd=build_dir, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise InstallError(f"building the broker's auth plugin failed (gcc, with the packages "
                               f"{', '.join(PLUGIN_BUILD_DEPS)}):\n{done.stderr[-3000:]}")
        os.replace(build_dir / "ipdc_auth.so", target)  # atomic: a concurrent build wins or loses whole
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    log.info("built the broker's auth plugin %s", target)
    return target
