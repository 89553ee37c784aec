#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests: a fresh cluster in a temp dir, listening on a free port on
# 127.0.0.1 only, with one database; KILN_TEST_DATABASE_URL points at it, and it is stopped and
# deleted when the shell that started it exits.
#
#   source scripts/postgres.sh     # (what scripts/test.sh does) sets KILN_TEST_DATABASE_URL in
#                                  # this shell and registers an EXIT trap that removes the cluster
#   scripts/postgres.sh CMD ARGS   # runs CMD with KILN_TEST_DATABASE_URL set, then removes it
#
# If initdb/pg_ctl are missing it installs Debian's `postgresql` package (needs root and apt).
# Postgres refuses to run as root, so as root the server runs as the `postgres` user the package
# creates (or `nobody`), owning only the temp dir.

kiln_pg_die() {
    echo "postgres.sh: $*" >&2
    return 1
}

kiln_pg_bindir() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
    done
    if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
        dirname "$(readlink -f "$(command -v initdb)")"
        return 0
    fi
    return 1
}

kiln_pg_install() {
    [ "$(id -u)" = 0 ] || kiln_pg_die "initdb/pg_ctl not found and not root: install postgresql" || return 1
    command -v apt-get >/dev/null || kiln_pg_die "initdb/pg_ctl not found and no apt-get" || return 1
    echo "postgres.sh: installing postgresql with apt" >&2
    # The package would create and start a `main` cluster on port 5432; we only want the binaries.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/kiln-no-main.conf
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
}

# Runs a command as the cluster's user (root cannot run postgres).
kiln_pg_as() {
    if [ -z "${KILN_PG_USER:-}" ]; then
        "$@"
    elif command -v runuser >/dev/null; then
        runuser -u "$KILN_PG_USER" -- "$@"
    else
        su -s /bin/sh "$KILN_PG_USER" -c "$(printf '%q ' "$@")"
    fi
}

kiln_pg_port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

kiln_pg_stop() {
    if [ -n "${KILN_PG_DIR:-}" ] && [ -d "$KILN_PG_DIR" ]; then
        kiln_pg_as "$KILN_PG_BIN/pg_ctl" -D "$KILN_PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "$KILN_PG_DIR"
    fi
    KILN_PG_DIR=
}

kiln_pg_start() {
    KILN_PG_BIN=$(kiln_pg_bindir) || { kiln_pg_install && KILN_PG_BIN=$(kiln_pg_bindir); } ||
        kiln_pg_die "no PostgreSQL binaries" || return 1
    KILN_PG_USER=
    if [ "$(id -u)" = 0 ]; then
        if id postgres >/dev/null 2>&1; then KILN_PG_USER=postgres; else KILN_PG_USER=nobody; fi
    fi
    KILN_PG_DIR=$(mktemp -d /tmp/kiln-pg.XXXXXX) || return 1
    [ -n "$KILN_PG_USER" ] && chown "$KILN_PG_USER" "$KILN_PG_DIR"
    chmod 700 "$KILN_PG_DIR"
    kiln_pg_as "$KILN_PG_BIN/initdb" -D "$KILN_PG_DIR/data" -U kiln --auth=trust -E UTF8 --no-locale \
        >"$KILN_PG_DIR/initdb.log" 2>&1 || { cat "$KILN_PG_DIR/initdb.log" >&2; kiln_pg_die "initdb failed"; return 1; }
    local port tries=0
    while :; do
        tries=$((tries + 1))
        [ $tries -le 20 ] || { kiln_pg_die "could not start postgres (see $KILN_PG_DIR/server.log)"; return 1; }
        port=$((20000 + RANDOM % 40000))
        kiln_pg_port_free "$port" || continue
        # -k: the unix socket goes in our dir (the default /var/run/postgresql may not exist);
        # listen_addresses: 127.0.0.1 only, never a public interface.
        if kiln_pg_as "$KILN_PG_BIN/pg_ctl" -D "$KILN_PG_DIR/data" -l "$KILN_PG_DIR/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $KILN_PG_DIR -c fsync=off" start >/dev/null; then
            break
        fi
    done
    kiln_pg_as "$KILN_PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U kiln kiln_test ||
        { kiln_pg_die "createdb failed"; return 1; }
    export KILN_TEST_DATABASE_URL="postgres://kiln@127.0.0.1:$port/kiln_test"
    echo "postgres.sh: KILN_TEST_DATABASE_URL=$KILN_TEST_DATABASE_URL" >&2
}

# bash runs an EXIT trap on `exit`, not when a signal kills it: turn INT/TERM/HUP into exits so a
# cancelled test run (Ctrl-C, CI timeout) still removes the cluster.
kiln_pg_traps() {
    trap kiln_pg_stop EXIT
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # Sourced: start, and remove the cluster when the sourcing shell exits.
    kiln_pg_traps
    kiln_pg_start || { kiln_pg_stop; return 1; }
else
    set -euo pipefail
    [ $# -gt 0 ] || { echo "usage: source $0  |  $0 CMD [ARGS...]" >&2; exit 2; }
    kiln_pg_traps
    kiln_pg_start
    "$@"
fi
