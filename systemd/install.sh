#!/bin/sh
# Install tidings as systemd services: the tidings user, a virtualenv, the units, the env file
# with fresh keys, and the kernel settings. Idempotent: run it again after `git pull` to upgrade
# (then do a rolling restart, see docs/production.md). Run as root:
#
#   sh systemd/install.sh                 # venv in /opt/tidings/venv, one worker per core
#   sh systemd/install.sh --workers 4     # enable tidings-worker@0..3 (and disable @4 and up)
#   sh systemd/install.sh --venv /srv/tidings/.venv   # use a venv that already has tidings
#
# Options:
#   --venv PATH     use this virtualenv (must contain bin/tidings) instead of /opt/tidings/venv
#   --workers N     worker instances to enable (default: the number of CPUs)
#   --no-sysctl     install /etc/sysctl.d/90-tidings.conf but do not apply it now
#   --no-enable     install the units but enable nothing
# Environment:
#   DESTDIR=DIR     stage everything under DIR (for packaging and tests): no sysctl, no
#                   daemon-reload, no chown unless root; needs --venv (the path as seen at run time)
#   PREFIX=DIR      where the default venv goes (default /opt/tidings)
#   PYTHON=python3  the interpreter the default venv is made from (3.11 or newer)
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
SRC="$REPO/systemd"
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/tidings}
# The system's interpreter: one under /root or /home (pyenv, ...) is out of the service user's
# reach and hidden by ProtectHome=yes.
if [ -z "${PYTHON:-}" ]; then
    if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
DEFAULT_VENV="/opt/tidings/venv"   # the path written in the unit files
VENV=""
WORKERS=""
APPLY_SYSCTL=1
ENABLE=1
SERVICE_USER=tidings
UNITDIR=/etc/systemd/system
CONFDIR=/etc/tidings
ENVFILE=$CONFDIR/tidings.env
SYSCTL_FILE=/etc/sysctl.d/90-tidings.conf

say() { printf 'install: %s\n' "$*"; }
warn() { printf 'install: warning: %s\n' "$*" >&2; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --venv) [ $# -ge 2 ] || die "--venv needs a path"; VENV=$2; shift 2 ;;
        --venv=*) VENV=${1#--venv=}; shift ;;
        --workers) [ $# -ge 2 ] || die "--workers needs a number"; WORKERS=$2; shift 2 ;;
        --workers=*) WORKERS=${1#--workers=}; shift ;;
        --no-sysctl) APPLY_SYSCTL=0; shift ;;
        --no-enable) ENABLE=0; shift ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1
if [ -z "$DESTDIR" ] && [ "$IS_ROOT" -ne 1 ]; then
    die "run as root (sudo sh systemd/install.sh), or set DESTDIR to stage the files"
fi
if [ -n "$DESTDIR" ]; then
    DESTDIR=$(mkdir -p "$DESTDIR" && cd "$DESTDIR" && pwd)
    APPLY_SYSCTL=0
fi

if [ -z "$WORKERS" ]; then
    WORKERS=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
fi
case "$WORKERS" in
    ''|*[!0-9]*) die "--workers wants a whole number, not '$WORKERS'" ;;
esac
[ "$WORKERS" -ge 1 ] || die "--workers must be at least 1"

# -- 1. the service user -------------------------------------------------------------------
# One static user for the hub and every worker: SO_REUSEPORT needs the same UID across the group,
# and the ipc:// sockets in /run/tidings are private to it.
user_exists() {
    if [ -n "$DESTDIR" ]; then
        grep -q "^$SERVICE_USER:" "$DESTDIR/etc/passwd" 2>/dev/null
    else
        getent passwd "$SERVICE_USER" >/dev/null 2>&1
    fi
}
[ -z "$DESTDIR" ] || mkdir -p "$DESTDIR/etc"
if user_exists; then
    say "user $SERVICE_USER exists"
elif command -v systemd-sysusers >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    systemd-sysusers ${DESTDIR:+--root="$DESTDIR"} \
        --inline "u $SERVICE_USER - \"tidings real-time event service\" /nonexistent /usr/sbin/nologin"
    say "created system user $SERVICE_USER"
elif [ -z "$DESTDIR" ]; then
    useradd --system --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin --comment "tidings real-time event service" "$SERVICE_USER"
    say "created system user $SERVICE_USER"
else
    die "cannot create $SERVICE_USER under DESTDIR without systemd-sysusers"
fi

# -- 2. the virtualenv ---------------------------------------------------------------------
check_reachable() {  # $1: a path the services must read, $2: what it is
    case "$1/" in
        /home/*|/root/*|/run/user/*)
            die "$2 $1 is out of reach for the services (ProtectHome=yes, user $SERVICE_USER): use the system python3 (PYTHON=/usr/bin/python3) and a venv outside /home and /root" ;;
    esac
}
interpreter() {  # the file behind a python command or a venv's bin/python (symlinks followed)
    p=$(command -v "$1" 2>/dev/null) || return 0
    readlink -f "$p"
}
case "$VENV" in
    '') ;;
    /*) ;;
    *) VENV=$(cd "$VENV" 2>/dev/null && pwd) || die "--venv: no such directory" ;;
esac
if [ -n "$VENV" ]; then
    VENV=${VENV%/}
    [ -x "$VENV/bin/tidings" ] || die "$VENV/bin/tidings not found: install tidings into that venv first"
    check_reachable "$(interpreter "$VENV/bin/python")" "the venv's interpreter"
else
    [ -z "$DESTDIR" ] || die "DESTDIR needs --venv (a venv that exists at run time)"
    VENV="$PREFIX/venv"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        || die "$PYTHON 3.11 or newer is needed (Debian 12: apt-get install python3)"
    check_reachable "$(interpreter "$PYTHON")" "the interpreter"
    if [ -x "$VENV/bin/python" ]; then
        check_reachable "$(interpreter "$VENV/bin/python")" "the interpreter of existing $VENV"
    else
        "$PYTHON" -c 'import ensurepip' 2>/dev/null \
            || die "$PYTHON cannot make a venv (Debian: apt-get install python3-venv)"
        mkdir -p "$PREFIX"
        "$PYTHON" -m venv "$VENV"
        say "created $VENV"
    fi
    say "installing tidings from $REPO into $VENV"
    # Build from a clean copy: setuptools would leave build/ and *.egg-info in the checkout.
    src=$(mktemp -d)
    trap 'rm -rf "$src"' EXIT
    tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./.cache --exclude=./build \
        --exclude='*.egg-info' --exclude='__pycache__' -cf - . | tar -C "$src" -xf -
    "$VENV/bin/pip" install --quiet --upgrade pip
    # --upgrade: a second run installs the checkout's current code.
    "$VENV/bin/pip" install --quiet --upgrade "$src"
    rm -rf "$src"
    trap - EXIT
    [ -x "$VENV/bin/tidings" ] || die "pip did not install $VENV/bin/tidings"
fi
check_reachable "$VENV" "the venv"
say "services will run $VENV/bin/tidings"

# -- 3. the units ----------------------------------------------------------------------------
mkdir -p "$DESTDIR$UNITDIR"
for unit in tidings-hub.service tidings-worker@.service tidings.target; do
    tmp="$DESTDIR$UNITDIR/.$unit.tmp"
    sed "s#$DEFAULT_VENV/#$VENV/#g" "$SRC/$unit" > "$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$DESTDIR$UNITDIR/$unit"
done
say "installed units in $DESTDIR$UNITDIR"

# -- 4. the env file (keys): created once, never overwritten -----------------------------------
random_hex() {  # $1 bytes of randomness as hex
    od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
}
mkdir -p "$DESTDIR$CONFDIR"
chmod 0750 "$DESTDIR$CONFDIR"
if [ -e "$DESTDIR$ENVFILE" ]; then
    say "kept existing $DESTDIR$ENVFILE"
else
    tmp="$DESTDIR$ENVFILE.tmp"
    (umask 077 && sed -e "s/^TIDINGS_JWT_SECRET=\$/TIDINGS_JWT_SECRET=$(random_hex 32)/" \
                      -e "s/^TIDINGS_API_KEY=\$/TIDINGS_API_KEY=$(random_hex 24)/" \
                      "$SRC/tidings.env.example" > "$tmp")
    mv -f "$tmp" "$DESTDIR$ENVFILE"
    say "created $DESTDIR$ENVFILE with a new JWT secret and API key"
fi
chmod 0640 "$DESTDIR$ENVFILE"
if [ "$IS_ROOT" -eq 1 ]; then
    if [ -n "$DESTDIR" ]; then
        gid=$(awk -F: -v u="$SERVICE_USER" '$1 == u { print $3 }' "$DESTDIR/etc/group")
    else
        gid=$SERVICE_USER
    fi
    chown "root:$gid" "$DESTDIR$CONFDIR" "$DESTDIR$ENVFILE"
fi
grep -Eq '^TIDINGS_JWT_(SECRET|PUBLIC_KEY)=.+' "$DESTDIR$ENVFILE" \
    || warn "$ENVFILE has no TIDINGS_JWT_SECRET or TIDINGS_JWT_PUBLIC_KEY: the services will refuse to start"

# -- 5. kernel settings ----------------------------------------------------------------------
env_value() {  # the last VAR=value of $1 in the env file, or $2
    v=$(sed -n "s/^$1=//p" "$DESTDIR$ENVFILE" | tail -n 1)
    echo "${v:-$2}"
}
port=$(env_value TIDINGS_PORT 8080)
api_port=$(env_value TIDINGS_API_PORT 8081)
reserved=$port
[ "$api_port" = "0" ] || [ "$api_port" = "$port" ] || reserved="$port,$api_port"
mkdir -p "$DESTDIR$(dirname "$SYSCTL_FILE")"
sed "s/^net.ipv4.ip_local_reserved_ports = .*/net.ipv4.ip_local_reserved_ports = $reserved/" \
    "$SRC/sysctl.d/90-tidings.conf" > "$DESTDIR$SYSCTL_FILE"
chmod 0644 "$DESTDIR$SYSCTL_FILE"
say "installed $DESTDIR$SYSCTL_FILE"
if [ "$APPLY_SYSCTL" -eq 1 ]; then
    # -e: skip keys this kernel lacks (tcp_migrate_req needs 5.14); a container may refuse some.
    sysctl -q -e -p "$SYSCTL_FILE" || warn "some kernel settings were not applied (a container?)"
fi

# -- 6. systemd ------------------------------------------------------------------------------
SYSTEMCTL="systemctl"
[ -z "$DESTDIR" ] || SYSTEMCTL="systemctl --root=$DESTDIR"
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
if [ "$ENABLE" -eq 1 ]; then
    units="tidings.target tidings-hub.service"
    i=0
    while [ "$i" -lt "$WORKERS" ]; do
        units="$units tidings-worker@$i.service"
        i=$((i + 1))
    done
    # shellcheck disable=SC2086
    $SYSTEMCTL enable --quiet $units
    # Fewer workers than last time: disable the extra instances (a running one keeps running).
    for link in "$DESTDIR$UNITDIR"/tidings.target.wants/tidings-worker@*.service; do
        [ -e "$link" ] || [ -L "$link" ] || continue
        n=${link##*@}
        n=${n%.service}
        case "$n" in ''|*[!0-9]*) continue ;; esac
        if [ "$n" -ge "$WORKERS" ]; then
            $SYSTEMCTL disable --quiet "tidings-worker@$n.service"
            say "disabled tidings-worker@$n.service"
        fi
    done
    say "enabled tidings.target, tidings-hub.service and tidings-worker@0..$((WORKERS - 1))"
fi

cat <<EOF

Done. Next:
  review $ENVFILE (TIDINGS_HOST, TIDINGS_ALLOWED_ORIGINS, ...)
  systemctl start tidings.target
  systemctl status 'tidings-*'  ·  journalctl -u 'tidings-*' -f
EOF
