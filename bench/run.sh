#!/usr/bin/env bash
# bench/run.sh — compare oauth-proxy with nginx, HAProxy and Caddy doing the
# same job on 127.0.0.1, and with "direct" (no proxy) as the floor.
#
#   bash bench/run.sh              # about 4 minutes; prints a Markdown report
#   ROUNDS=5 OUT=/tmp/r.md bash bench/run.sh
#
# Needs root (or the tools already installed), Go, and a quiet machine; it is
# not a CI step. See bench/README.md for what each figure means.
#
# Environment:
#   ROUNDS      rounds, each visiting every peer once (default 3; fewer is
#               only a trial run: the report is medians over the rounds)
#   DURATION    measured wrk run per peer and round (default 5s)
#   BASE_PORT   the upstream's port (default 18400); the peers listen on the
#               next four, the upstream's TLS port is BASE_PORT+9
#   PEERS       which peers, in the first round's order
#               (default "oauth-proxy nginx haproxy caddy direct oauth-proxy-tls";
#               also oauth-proxy-info: oauth-proxy with its request log on)
#   OUT         also write the report there
#   KEEP        1: keep the work directory (configs, logs)
#   SRC         the oauth-proxy source tree to build (default: this checkout)
#   TESTS       which tests: all (default) or a comma list of post, sse,
#               big, streams, close (start-up and idle memory always run)
#   VARIANTS    more oauth-proxy builds to compare in the same run, as
#               "name=source-dir ...", e.g. VARIANTS="new=/tmp/op-new";
#               each runs with oauth-proxy's config and is added to PEERS
set -euo pipefail

bench_dir=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$bench_dir/.." && pwd)
rounds=${ROUNDS:-3}
if [ "$rounds" -lt 3 ]; then
	printf 'bench: ROUNDS=%s: medians of fewer than 3 rounds are a trial run, not a result\n' "$rounds" >&2
fi
duration=${DURATION:-5s}
base=${BASE_PORT:-18400}
peers=${PEERS:-"oauth-proxy nginx haproxy caddy direct oauth-proxy-tls"}
out=${OUT:-}
src=${SRC:-$root}
variants=${VARIANTS:-}

say() { printf 'bench: %s\n' "$*" >&2; }

# 1. Tools: nginx, HAProxy, Caddy and wrk from Debian, installed only when
#    missing (one apt-get update, one install).
missing=()
for tool in nginx haproxy caddy wrk; do
	command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
	say "installing ${missing[*]}"
	if [ "$(id -u)" -ne 0 ]; then
		say "need root to apt-get install ${missing[*]}; install them or run as root"
		exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v go >/dev/null || { say "need the Go toolchain"; exit 1; }

# 2. File descriptors: 1,000 streams are 1,000 client sockets, 2,000 in
#    each proxy and 1,000 in the upstream. Every process started from here
#    inherits the limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 4096 ]; then
	say "ulimit -n is $(ulimit -n); need at least 4096 for 1,000 streams (raise the hard limit)"
	exit 1
fi

# 3. Build oauth-proxy as the Dockerfile does, and the harness.
work=$(mktemp -d /tmp/oauth-proxy-bench.XXXXXX)
upstream_pid=
cleanup() {
	if [ -n "$upstream_pid" ]; then
		kill "$upstream_pid" 2>/dev/null || true
		wait "$upstream_pid" 2>/dev/null || true
	fi
	if [ "${KEEP:-}" = 1 ]; then say "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
say "building into $work"
(cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$work/oauth-proxy" .)
for v in $variants; do
	(cd "${v#*=}" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$work/oauth-proxy-${v%%=*}" .)
	peers="$peers ${v%%=*}"
done
(cd "$bench_dir" && go build -o "$work/upstream" ./upstream && go build -o "$work/client" ./client)

up=127.0.0.1:$base
op_addr=127.0.0.1:$((base + 1))
nginx_addr=127.0.0.1:$((base + 2))
haproxy_addr=127.0.0.1:$((base + 3))
caddy_addr=127.0.0.1:$((base + 4))
tls_up=127.0.0.1:$((base + 9))

# 4. Configurations: the same job for every peer. Keep-alive to the
#    upstream, anthropic-beta set, response buffering off so SSE streams,
#    no access log, request bodies up to 10 MiB, 60 s upstream timeouts.
#    Same cores for everyone: nginx 2 workers, HAProxy 2 threads, the Go
#    programs (oauth-proxy, Caddy) GOMAXPROCS = the machine's cores.

# oauth-proxy: the shipped settings, except max_connections (2,000, so the
# 1,000-stream test never queues behind its own slots) and LOG_LEVEL=warn,
# which turns off its one log line per request, its access log.
cat >"$work/oauth-proxy.toml" <<EOF
[proxy]
listen_addr = "$op_addr"
upstream_url = "http://$up"
timeout_secs = 60
max_connections = 2000
max_body_bytes = 10485760

[[headers]]
name = "anthropic-beta"
value = "oauth-2025-04-20"
mode = "append"
EOF

mkdir -p "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 16384;
pid $work/nginx/nginx.pid;
error_log stderr warn;
events {
    worker_connections 8192;
}
http {
    access_log off;
    client_body_temp_path $work/nginx/body;
    proxy_temp_path $work/nginx/proxy;
    fastcgi_temp_path $work/nginx/fastcgi;
    uwsgi_temp_path $work/nginx/uwsgi;
    scgi_temp_path $work/nginx/scgi;
    keepalive_timeout 120s;
    keepalive_requests 1000000;   # default 1000 would make wrk reconnect
    client_max_body_size 10m;
    upstream api {
        server $up;
        keepalive 256;            # idle upstream connections kept per worker
        keepalive_requests 1000000;
        keepalive_timeout 90s;
    }
    server {
        listen $nginx_addr;
        location / {
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header anthropic-beta "oauth-2025-04-20";
            proxy_buffering off;  # stream responses, SSE event by event
            proxy_connect_timeout 5s;
            proxy_read_timeout 60s;
        }
    }
}
EOF

cat >"$work/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 120s
    option http-no-delay           # without it HAProxy batches SSE events
    http-reuse always              # keep-alive to the upstream for every request
frontend fe
    bind $haproxy_addr
    default_backend api
backend api
    http-request set-header anthropic-beta oauth-2025-04-20
    server api $up
EOF

mkdir -p "$work/caddy"
cat >"$work/Caddyfile" <<EOF
{
	admin off
	auto_https off
}
http://:$((base + 4)) {
	bind 127.0.0.1
	reverse_proxy $up {
		header_up anthropic-beta "oauth-2025-04-20"
		flush_interval -1
		transport http {
			keepalive 90s
			keepalive_idle_conns 1024
			keepalive_idle_conns_per_host 1024
		}
	}
}
EOF

# oauth-proxy-tls: the same, in front of the upstream's TLS port, so that
# the upstream connection is HTTP/2 over TLS as to api.anthropic.com. Not a
# like-for-like comparison with the other peers (they talk HTTP/1.1 in
# clear): it shows what TLS and HTTP/2 cost or save, per request and per
# stream, in the production shape. The upstream's certificate reaches Go's
# root pool through SSL_CERT_FILE.
sed "s#upstream_url = \"http://$up\"#upstream_url = \"https://$tls_up\"#" \
	"$work/oauth-proxy.toml" >"$work/oauth-proxy-tls.toml"

# The peers file: name, address, probe path, environment, command. Peers
# without a /health of their own are probed on a proxied path (the
# upstream's /health).
{
	for p in $peers; do
		case $p in
		oauth-proxy) echo "oauth-proxy $op_addr /health LOG_LEVEL=warn $work/oauth-proxy -config $work/oauth-proxy.toml" ;;
		oauth-proxy-tls) echo "oauth-proxy-tls $op_addr /health LOG_LEVEL=warn SSL_CERT_FILE=$work/upstream.pem $work/oauth-proxy -config $work/oauth-proxy-tls.toml" ;;
		oauth-proxy-info) echo "oauth-proxy-info $op_addr /health LOG_LEVEL=info $work/oauth-proxy -config $work/oauth-proxy.toml" ;;
		nginx) echo "nginx $nginx_addr /health $(command -v nginx) -p $work/nginx/ -c $work/nginx/nginx.conf -e stderr" ;;
		haproxy) echo "haproxy $haproxy_addr /health $(command -v haproxy) -db -f $work/haproxy.cfg" ;;
		caddy) echo "caddy $caddy_addr /health HOME=$work/caddy XDG_DATA_HOME=$work/caddy XDG_CONFIG_HOME=$work/caddy $(command -v caddy) run --config $work/Caddyfile --adapter caddyfile" ;;
		direct) echo "direct $up /health -" ;;
		*)
			if [ -x "$work/oauth-proxy-$p" ]; then
				echo "$p $op_addr /health LOG_LEVEL=warn $work/oauth-proxy-$p -config $work/oauth-proxy.toml"
			else
				say "unknown peer $p"
				exit 1
			fi
			;;
		esac
	done
} >"$work/peers"

# 5. The upstream, shared by every peer for the whole run.
"$work/upstream" -addr "$up" -tls-addr "$tls_up" -cert-out "$work/upstream.pem" 2>"$work/upstream.log" &
upstream_pid=$!

# 6. The rounds. The client starts and stops each peer itself, so that it
#    can time exec → first 200 and find the peer's processes.
say "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
"$work/client" -upstream "$up" -peers "$work/peers" -rounds "$rounds" \
	-duration "$duration" -tests "${TESTS:-all}" -work "$work" ${out:+-out "$out"}
