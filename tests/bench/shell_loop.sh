#!/bin/sh
# A failover loop as people write it, the kind multiwan-agent replaces: ping the
# primary's path every INTERVAL seconds, after FALL failures in a row point the
# default route at the backup, after RISE successes in a row point it back.
#
# Benchmark use only (tests/bench/side_by_side.py, tests/test_lab_bench.py): it
# changes the default route of the namespace it runs in, so the runner starts it
# with `ip netns exec <lab router>`; it refuses to run in the root namespace.
#
#   shell_loop.sh PRIMARY_IF PRIMARY_GW BACKUP_IF BACKUP_GW [TARGET [INTERVAL [FALL [RISE]]]]
# or the same from the environment: PRIMARY_IF PRIMARY_GW BACKUP_IF BACKUP_GW
# TARGET INTERVAL FALL RISE. Logs one line per switch, with a monotonic-ish stamp.
set -u

PRIMARY_IF=${1:-${PRIMARY_IF:?primary interface}}
PRIMARY_GW=${2:-${PRIMARY_GW:?primary gateway}}
BACKUP_IF=${3:-${BACKUP_IF:?backup interface}}
BACKUP_GW=${4:-${BACKUP_GW:?backup gateway}}
TARGET=${5:-${TARGET:-198.18.1.1}}
INTERVAL=${6:-${INTERVAL:-1}}
FALL=${7:-${FALL:-3}}
RISE=${8:-${RISE:-3}}

# `ip netns identify` prints the name of the namespace we are in, nothing in the root one.
if [ -z "$(ip netns identify "$$" 2>/dev/null)" ]; then
    echo "shell_loop.sh: not inside a named network namespace; refusing to change routes" >&2
    exit 2
fi

log() { echo "$(date +%s.%N) $*"; }

ip route replace default via "$PRIMARY_GW" dev "$PRIMARY_IF"
log "start: default via $PRIMARY_GW dev $PRIMARY_IF"
active=primary
fails=0
oks=0
while :; do
    if ping -c1 -W1 -I "$PRIMARY_IF" "$TARGET" >/dev/null 2>&1; then
        fails=0
        oks=$((oks + 1))
    else
        oks=0
        fails=$((fails + 1))
    fi
    if [ "$active" = primary ] && [ "$fails" -ge "$FALL" ]; then
        ip route replace default via "$BACKUP_GW" dev "$BACKUP_IF"
        active=backup
        log "failover: $fails failures, default via $BACKUP_GW dev $BACKUP_IF"
    elif [ "$active" = backup ] && [ "$oks" -ge "$RISE" ]; then
        ip route replace default via "$PRIMARY_GW" dev "$PRIMARY_IF"
        active=primary
        log "failback: $oks successes, default via $PRIMARY_GW dev $PRIMARY_IF"
    fi
    sleep "$INTERVAL"
done
