#!/bin/sh
# Render nginx.conf.template into an nginx.conf: substitutes the LB_* variables only, so nginx's
# own $host etc. stay. Every LB_* variable must be set. Used by the compose `scale` profile (run by
# the nginx image's entrypoint from /docker-entrypoint.d) and by tests/e2e/test_scale_out.py.
#   LB_HTTP_SERVERS / LB_GRPC_SERVERS  upstream `server host:port max_fails=.. fail_timeout=..;` lines
#   LB_HTTP_LISTEN / LB_GRPC_LISTEN    listen addresses (`8000`, `127.0.0.1:18000`)
#   LB_RUNTIME_DIR                     a writable folder for the pid file and temporary bodies
#   LB_TEMPLATE / LB_OUTPUT            template and output paths (defaults: beside this script / /etc/nginx/nginx.conf)
set -eu
here=$(dirname "$0")
template=${LB_TEMPLATE:-$here/nginx.conf.template}
output=${LB_OUTPUT:-/etc/nginx/nginx.conf}
for name in LB_HTTP_SERVERS LB_GRPC_SERVERS LB_HTTP_LISTEN LB_GRPC_LISTEN LB_RUNTIME_DIR; do
    eval "value=\${$name:-}"
    [ -n "$value" ] || { echo "render.sh: $name is not set" >&2; exit 1; }
done
mkdir -p "$LB_RUNTIME_DIR"
# shellcheck disable=SC2016  # the list names the variables envsubst may replace; it is not expanded here
envsubst '${LB_HTTP_SERVERS} ${LB_GRPC_SERVERS} ${LB_HTTP_LISTEN} ${LB_GRPC_LISTEN} ${LB_RUNTIME_DIR}' \
    < "$template" > "$output"
echo "render.sh: wrote $output from $template"
