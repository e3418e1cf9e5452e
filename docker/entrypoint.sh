#!/usr/bin/env bash
# The main process of an IPDC node container, the way a person sets up a machine:
#
#   ROLE=founder  the first start founds the swarm (`ipdc node init`); then the node starts,
#                 and for each name in JOINERS that has not joined yet the founder writes an
#                 invite token to /invites/NAME (a volume shared with the joiners).
#   ROLE=joiner   the first start waits for /invites/$NAME and joins with it
#                 (`ipdc node init --join-file`); then the node starts. The token is then
#                 deleted and /invites/$NAME.joined left in its place.
#
# Compose starts the joiners only once the founder is healthy (docker/healthcheck.sh): its
# broker and agent are up and the invites are written. Joining needs both, since the
# founder's agent may take part in it. Every later start reuses the node's home ($IPDC_HOME,
# a volume). The node stops cleanly on SIGTERM (docker stop, docker-compose down).
# `ipdc node ...` is what `python deploy.py ...` runs; the image holds no source tree.
set -euo pipefail

: "${ROLE:?set ROLE=founder or ROLE=joiner}" "${IPDC_HOME:?}"
READY=/run/ipdc-ready
# The node binds and advertises the container's address on the compose network (fixed there,
# since the node's config and its peers keep it).
HOST=$(hostname -i | awk '{print $1}')

log() { printf '[%s] %s\n' "$(hostname)" "$*" >&2; }
# Set before the node starts, so that a stop during set-up stops it too (bash runs the trap once
# the command in progress has returned).
stop() {
  rm -f "$READY"
  ipdc node stop
  exit 0
}
trap stop TERM INT

rm -f "$READY"
# The user-code sandbox (bubblewrap) mounts a fresh /proc inside a new user namespace, which the
# kernel refuses while parts of /proc are covered: Docker masks /proc/kcore, /proc/keys, ... and
# makes /proc/sys read-only, and docker-compose 1.29 cannot ask for `systempaths=unconfined`.
# The container may undo those mounts itself (it has SYS_ADMIN, granted for the sandbox); the
# sandbox then gives user code a /proc of its own pid namespace, with none of the host's.
grep ' /proc/' /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r mount; do
  umount "$mount" 2>/dev/null || umount -l "$mount" 2>/dev/null || log "could not unmount $mount"
done
# The agent's log is the container's log: from its end (the volume keeps earlier runs' lines),
# or from the start of a node's first log.
tail -n 0 -F "$IPDC_HOME/logs/agent.log" 2>/dev/null &
# No process of an earlier run of this container survives it, so pid files left by a container
# that was killed are stale; a new process could even have the same pid.
rm -f "$IPDC_HOME"/run/*.pid

case "$ROLE" in
  founder)
    ipdc node init --host "$HOST"  # the second time: "already initialised; nothing changed"
    ipdc node start
    for peer in ${JOINERS:-}; do
      if [ ! -e "/invites/$peer" ] && [ ! -e "/invites/$peer.joined" ]; then
        # Written aside and renamed, so that a joiner never reads half a token.
        rm -f "/invites/.$peer"
        ipdc invite -o "/invites/.$peer"
        mv "/invites/.$peer" "/invites/$peer"
      fi
    done
    ;;
  joiner)
    : "${NAME:?set NAME, the file name of the invite for this node}"
    if [ ! -f "$IPDC_HOME/ipdc.conf" ]; then
      [ -s "/invites/$NAME" ] || log "waiting for the invite /invites/$NAME from the founder"
      until [ -s "/invites/$NAME" ]; do sleep 1; done
      ipdc node init --host "$HOST" --join-file "/invites/$NAME"
      # Used: it must not lie around where other containers can read it.
      rm -f "/invites/$NAME"
      touch "/invites/$NAME.joined"
    fi
    ipdc node start
    ;;
  *)
    log "ROLE must be founder or joiner, not '$ROLE'"
    exit 2
    ;;
esac

touch "$READY"
# `wait` returns when a signal arrives, so the trap runs.
wait
