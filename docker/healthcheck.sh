#!/usr/bin/env bash
# Healthy: the entrypoint has set the node up (the founder has written the invites too), and
# the processes of the node's services are alive: agent and kubo, plus mosquitto on the
# founder. Plain shell rather than `ipdc node status`, which would start Python every few
# seconds in every container.
set -euo pipefail

[ -f /run/ipdc-ready ] || exit 1
services=(agent ipfs)
if [ "${ROLE:-}" = founder ]; then services+=(mosquitto); fi
for service in "${services[@]}"; do
  pid=$(cat "$IPDC_HOME/run/$service.pid")
  # A process that died but was not yet reaped is a zombie (state Z): not alive.
  state=$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
  [ "$state" != Z ] || exit 1
done
