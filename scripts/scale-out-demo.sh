#!/usr/bin/env bash
# Conveyor across "machines" on one Linux box: the API and two workers, each in its own network
# namespace, joined to Redis and PostgreSQL by a bridge of veth links. Run as root from the
# repository (after `make install`); it cleans up after itself.
#
#   host (root namespace)  10.77.0.1   Redis :6379, PostgreSQL :5432
#   cv-api                 10.77.0.2   conveyor serve --no-workers :8000
#   cv-w1                  10.77.0.3   conveyor worker (prefork, 2 processes)
#   cv-w2                  10.77.0.4   conveyor worker (prefork, 2 processes)
#
# It submits a batch of tasks to the API over the link, waits for them, and prints how many
# ran on each worker "host".
set -euo pipefail
cd "$(dirname "$0")/.."

TASKS=${TASKS:-200}
PY=${PY:-.venv/bin/python}
NET=10.77.0
WORK=$(mktemp -d /tmp/conveyor-scale-out-XXXXXX)
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort | tail -1)
NAMESPACES=(cv-api cv-w1 cv-w2)
PIDS=()

cleanup() {
    set +e
    for ns in "${NAMESPACES[@]}"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill -9; done
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -m fast -w stop >/dev/null 2>&1
    for ns in "${NAMESPACES[@]}"; do ip link del "v-$ns" 2>/dev/null; ip netns del "$ns" 2>/dev/null; done
    ip link del cvbr0 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== network: a bridge and one veth link per namespace"
ip link add cvbr0 type bridge
ip addr add "$NET.1/24" dev cvbr0
ip link set cvbr0 up
i=2
for ns in "${NAMESPACES[@]}"; do
    ip netns add "$ns"
    ip link add "v-$ns" type veth peer name eth0 netns "$ns"
    ip link set "v-$ns" master cvbr0 up
    ip -n "$ns" addr add "$NET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    i=$((i + 1))
done

echo "== Redis and PostgreSQL on the host side of the link ($NET.1)"
redis-server --bind "$NET.1" --port 6379 --protected-mode no --save '' --appendonly no \
    --daemonize no >"$WORK/redis.log" 2>&1 &
PIDS+=($!) && disown
chown postgres "$WORK"
runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg" -U conveyor -A trust >/dev/null
echo "host all all $NET.0/24 trust" >>"$WORK/pg/pg_hba.conf"
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w \
    -o "-c listen_addresses=$NET.1 -p 5432 -k $WORK" start >/dev/null

export CONVEYOR_ENGINE=celery
export CONVEYOR_BROKER_URL="redis://$NET.1:6379/0"
export CONVEYOR_DATABASE_URL="postgresql://conveyor@$NET.1:5432/postgres"
export CONVEYOR_DATA_DIR="$WORK/data"
export CONVEYOR_LOG_LEVEL=warning

wait_for() {  # wait_for <log file> <text>
    for _ in $(seq 1 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "timed out waiting for '$2' in $1" >&2
    tail -20 "$1" >&2
    return 1
}

echo "== the API in cv-api, a worker in cv-w1 and one in cv-w2"
KEY=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
CONVEYOR_API_KEYS="demo:$KEY" ip netns exec cv-api setsid "$PY" -m conveyor serve --no-workers --host "$NET.2" --port 8000 \
    --log-level info --no-access-log >"$WORK/api.log" 2>&1 &
PIDS+=($!) && disown
for ns in cv-w1 cv-w2; do
    ip netns exec "$ns" setsid "$PY" -m conveyor worker --processes 2 --log-level info \
        >"$WORK/$ns.log" 2>&1 &
    PIDS+=($!) && disown
done
wait_for "$WORK/api.log" "Uvicorn running on"
wait_for "$WORK/cv-w1.log" " ready."
wait_for "$WORK/cv-w2.log" " ready."

echo "== $TASKS tasks submitted to http://$NET.2:8000 from the host"
for _ in $(seq 1 "$TASKS"); do
    curl -s -o /dev/null -w '%{http_code}\n' -X POST "http://$NET.2:8000/tasks" \
        -H 'content-type: application/json' -H "authorization: Bearer $KEY" \
        -d '{"name": "demo.sleep", "args": {"seconds": 0.05, "steps": 1}}'
done | sort | uniq -c

query() { psql -qtA -h "$NET.1" -U conveyor -d postgres -c "$1"; }
for _ in $(seq 1 600); do
    left=$(query "SELECT count(*) FROM conveyor_tasks WHERE status IN ('queued', 'running')")
    [ "$left" = 0 ] && break
    sleep 0.2
done

echo "== outcome"
query "SELECT status, count(*) FROM conveyor_tasks GROUP BY status"
echo "== tasks run per worker host (network namespace)"
for ns in cv-w1 cv-w2; do
    pids=$(ip netns pids "$ns" | paste -sd, -)
    n=$(query "SELECT count(*) FROM conveyor_tasks
               WHERE split_part(worker_id, ':', 2) = ANY (string_to_array('$pids', ','))")
    echo "$ns: $n"
done
