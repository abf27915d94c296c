#!/bin/sh
# Profiles one proxy under closed-loop load in the pinned layout, with the
# proxy on core 1 and the backend and load generator on core 0. It records
# a perf CPU profile and counts system calls. The profile samples the
# cpu-clock software event, because VMs often expose no hardware counters.
#
# usage: profile.sh switchyard|nginx SWITCHYARD_BENCH [SWITCHYARD_BIN] [OUT_DIR]
set -eu
KIND=$1
SB=$2
BIN=${3:-}
OUT=${4:-/tmp/switchyard-profile-$KIND}
mkdir -p "$OUT"
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
taskset -c 0 "$SB" backend --name blue > "$OUT/backend.out" 2>&1 &
BACKEND_PID=$!
trap 'kill $BACKEND_PID 2>/dev/null || true; [ -n "${PROXY_PID:-}" ] && kill -INT $PROXY_PID 2>/dev/null || true' EXIT
sleep 0.5
BACKEND=$(head -1 "$OUT/backend.out")
PORT=$(free_port)
case $KIND in
switchyard)
  cat > "$OUT/switchyard.toml" <<EOT
[listeners]
http = "127.0.0.1:$PORT"
threads = 1
upgrade_socket = "$OUT/upgrade.sock"
pid_file = "$OUT/switchyard.pid"
[admin]
metrics = "off"
[log]
level = "warn"
access_log = false
[[routes]]
name = "bench"
hosts = ["*"]
pools = { blue = 100 }
[pools.blue]
backends = ["$BACKEND"]
health = { path = "/health", interval = "1s" }
EOT
  taskset -c 1 "$BIN" run -c "$OUT/switchyard.toml" > "$OUT/proxy.log" 2>&1 &
  PROXY_PID=$!
  ;;
nginx)
  mkdir -p "$OUT/nginx-tmp"
  cat > "$OUT/nginx.conf" <<EOT
worker_processes 1;
daemon off;
master_process off;
pid $OUT/nginx.pid;
error_log $OUT/nginx-error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path $OUT/nginx-tmp;
    proxy_temp_path $OUT/nginx-tmp;
    upstream backend { server $BACKEND; keepalive 128; keepalive_requests 10000000; }
    server {
        listen 127.0.0.1:$PORT backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
EOT
  # master_process off: one process to attach perf to, same work per request.
  taskset -c 1 nginx -c "$OUT/nginx.conf" -p "$OUT" -e "$OUT/nginx-error.log" > "$OUT/proxy.log" 2>&1 &
  PROXY_PID=$!
  ;;
*) echo "unknown proxy $KIND: use switchyard or nginx" >&2; exit 2 ;;
esac
sleep 1.5
taskset -c 0 "$SB" load "http://127.0.0.1:$PORT/" -d 2s > /dev/null
# CPU profile over 12 s of a 15 s run.
taskset -c 0 "$SB" load "http://127.0.0.1:$PORT/" -d 15s --json "$OUT/load-profile.json" > "$OUT/load-profile.txt" &
LOAD_PID=$!
sleep 1
perf record -F 499 -e cpu-clock -g -p $PROXY_PID -o "$OUT/perf.data" -- sleep 12 2> "$OUT/perf-record.err"
wait $LOAD_PID
# System calls per request over a 5 s run of exactly counted requests.
taskset -c 0 "$SB" load "http://127.0.0.1:$PORT/" -d 8s --json "$OUT/load-syscalls.json" > "$OUT/load-syscalls.txt" &
LOAD_PID=$!
sleep 1
perf trace -s -p $PROXY_PID -o "$OUT/syscalls.txt" -- sleep 5 || true
wait $LOAD_PID
perf report -i "$OUT/perf.data" --no-children --sort dso,symbol -g none --stdio 2> /dev/null > "$OUT/report.txt"
echo "profile in $OUT/report.txt, system calls in $OUT/syscalls.txt"
