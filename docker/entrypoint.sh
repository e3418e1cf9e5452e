#!/bin/sh
# Node 1 (ROLE=founder) founds the swarm, hosts the broker and writes one invite per
# joiner into the shared volume; the others wait for theirs, join, and start.
set -eu
HOST=$(hostname -i | awk '{print $1}')
if [ "$ROLE" = founder ]; then
  python deploy.py init --host "$HOST"
  python deploy.py start
  for peer in $JOINERS; do
    [ -s "/invites/$peer" ] || ipdc invite -o "/invites/$peer"
  done
else
  while [ ! -s "/invites/$NAME" ]; do sleep 1; done
  python deploy.py init --host "$HOST" --join-file "/invites/$NAME"
  python deploy.py start
fi
trap 'python deploy.py stop; exit 0' TERM INT
tail -F "$IPDC_HOME/logs/agent.log" & wait
