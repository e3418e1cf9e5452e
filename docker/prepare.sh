#!/usr/bin/env bash
# Prepare what `docker-compose build` needs from this machine, then build with:
#
#   docker/prepare.sh && docker-compose up -d --build
#
# 1. The base image local/debian:bookworm, made from Debian packages with debootstrap and
#    `docker import`: no image registry is reachable where IPDC is developed, so the
#    Dockerfile cannot start FROM a pulled image. Skipped when the image exists (FORCE=1
#    rebuilds it). Needs root and debootstrap; takes about a minute.
# 2. docker/context/ (git-ignored), the host-specific part of the build context:
#    - ipfs       this machine's kubo binary, found (or built with Go) as `deploy.py install`
#                 does: no registry ships kubo, and building it in the image would need
#                 Go 1.25 and minutes per cold build. It links only glibc >= 2.34 (bookworm: 2.36).
#    - certs/     the CA certificates this machine adds to Debian's set
#                 (/usr/local/share/ca-certificates): HTTPS from the build may be intercepted
#                 by an egress proxy whose CA pip must trust. Certificates are public; a
#                 file holding a private key is refused.
#    - pip.conf   pip settings that make sense inside the image (the system CA bundle, the
#                 host's timeout and index when it carries no credentials); host-only paths
#                 such as find-links are left out.
#
# Overrides: IMAGE (base image tag), SUITE, MIRROR, SECURITY_MIRROR (default: the host's
# apt sources), FORCE=1, IPDC_KUBO_BIN (the kubo binary to copy).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CONTEXT=$REPO/docker/context
IMAGE=${IMAGE:-local/debian:bookworm}
SUITE=${SUITE:-bookworm}

log() { printf '[prepare] %s\n' "$*" >&2; }
die() { printf '[prepare] ERROR: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null || die "the docker CLI is missing: apt-get install docker.io"
docker info >/dev/null 2>&1 \
  || die "the Docker engine does not answer (docker info): start it (systemctl start docker, or dockerd &)"

# The Debian mirror this machine's apt uses (deb822 *.sources or one-line sources.list), so the
# image reaches the same mirror the host does. $1: the path it ends with (/debian, /debian-security).
host_mirror() {
  local suffix=$1
  {
    awk -v s="$suffix" 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i ~ s "/?$") print $i }' \
      /etc/apt/sources.list.d/*.sources 2>/dev/null || true
    awk -v s="$suffix" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ "^https?://" && $i ~ s "/?$") print $i }' \
      /etc/apt/sources.list 2>/dev/null || true
  } | head -n 1 | sed 's:/$::'
}

# Delete a debootstrap target. debootstrap mounts proc and sys inside it and leaves them mounted
# when it fails: unmount them first, so that rm never walks into the host's /proc or /sys.
remove_rootfs() {
  local rootfs=$1 mount
  while IFS= read -r mount; do
    umount -l "$mount" || true
  done < <(awk -v r="$rootfs/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r)
  if awk -v r="$rootfs/" 'index($2, r) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
    log "WARNING: mounts remain under $rootfs; it was not deleted"
  else
    rm -rf --one-file-system "$rootfs"
  fi
}

build_base() {
  if [ "${FORCE:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "base image $IMAGE exists (FORCE=1 rebuilds it)"
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "building $IMAGE needs root (debootstrap): run this script as root"
  command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
  local mirror security rootfs started=$SECONDS
  mirror=${MIRROR:-$(host_mirror /debian)}
  mirror=${mirror:-http://deb.debian.org/debian}
  security=${SECURITY_MIRROR:-$(host_mirror /debian-security)}
  security=${security:-${mirror%/debian}/debian-security}
  rootfs=$(mktemp -d /var/tmp/ipdc-rootfs.XXXXXX)
  # shellcheck disable=SC2064  # expand $rootfs now: it is local to this function
  trap "remove_rootfs '$rootfs'" EXIT
  log "debootstrap --variant=minbase $SUITE from $mirror (about a minute)"
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -n 25 "$rootfs.log" >&2
    die "debootstrap failed (log above, whole log in $rootfs.log)"
  }
  rm -f "$rootfs.log"

  # apt in the image: the host's mirrors, in the deb822 format of Debian's own images.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # Keep layers small, as Debian's official images do: no .deb cache, no translations.
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
  # Maintainer scripts must not start daemons during a build (mosquitto's postinst would).
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  # Docker provides /dev, resolv.conf, hostname and hosts; drop the host's copies and caches.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/var/log/*.log
  mkdir -p "$rootfs/var/lib/apt/lists/partial"
  find "$rootfs/dev" -mindepth 1 -delete
  : >"$rootfs/etc/resolv.conf"
  : >"$rootfs/etc/hostname"

  tar --numeric-owner -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'CMD ["bash"]' \
    -m "debootstrap --variant=minbase $SUITE $mirror" - "$IMAGE" >/dev/null \
    || die "docker import of $rootfs failed"
  docker run --rm "$IMAGE" test -s /etc/debian_version || die "the new image $IMAGE does not run"
  log "built $IMAGE in $((SECONDS - started)) s"
}

prepare_context() {
  mkdir -p "$CONTEXT/certs"

  # kubo: the lookup IPDC itself does (IPDC_KUBO_BIN, PATH, $GOPATH/bin), building the pinned
  # version with Go when there is none. ipdc.node.install needs only the standard library.
  local kubo
  kubo=$(cd "$REPO" && python3 -c 'from ipdc.node.install import ensure_kubo; print(ensure_kubo())') \
    || die "no kubo binary: see the error above (deploy.py install finds or builds one)"
  # Copy only when it changed: the copy is 120 MB.
  cmp -s "$kubo" "$CONTEXT/ipfs" || install -m 0755 "$kubo" "$CONTEXT/ipfs"
  log "kubo: $kubo ($("$CONTEXT/ipfs" version))"

  local cert
  rm -f "$CONTEXT"/certs/*.crt
  while IFS= read -r -d '' cert; do
    ! grep -q 'PRIVATE KEY' "$cert" || die "$cert holds a private key: it must not go into an image"
    cp "$cert" "$CONTEXT/certs/$(basename "$cert")"
  done < <(find /usr/local/share/ca-certificates -name '*.crt' -type f -print0 2>/dev/null)
  log "CA certificates: $(find "$CONTEXT/certs" -name '*.crt' -printf '%f ' | sed 's/ $//')"

  # The host's pip settings that mean the same inside the image. A PIP_* variable wins over
  # pip's config files, as in pip itself.
  local index timeout
  index=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
  timeout=${PIP_DEFAULT_TIMEOUT:-$(python3 -m pip config get global.timeout 2>/dev/null || true)}
  case "$index" in
    *://*@*) log "not copying pip's index-url: it holds credentials"; index="" ;;
  esac
  {
    echo "# Generated by docker/prepare.sh from this machine's pip settings."
    echo "[global]"
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    echo "disable-pip-version-check = true"
    if [ -n "$timeout" ]; then echo "timeout = $timeout"; fi
    if [ -n "$index" ]; then echo "index-url = $index"; fi
  } >"$CONTEXT/pip.conf"
  log "wrote $CONTEXT/pip.conf"
}

build_base
prepare_context
