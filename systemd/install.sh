#!/bin/sh
# Install tidings as systemd services: the tidings user, a virtualenv, the units, the env file
# with fresh keys, and the kernel settings. Idempotent: run it again after `git pull` to upgrade
# (then do a rolling restart, see docs/production.md). Run as root:
#
#   sh systemd/install.sh                 # venv in /opt/tidings/venv, one hub, one worker per core
#   sh systemd/install.sh --workers 4     # enable tidings-worker@0..3 (and disable @4 and up)
#   sh systemd/install.sh --hubs 2        # two hub shards here: tidings-hub@0 and @1
#   sh systemd/install.sh --role hubs --hubs 2      # a hub host: shards only, no workers
#   sh systemd/install.sh --role workers --hubs 2   # a worker host: its hubs run elsewhere
#   sh systemd/install.sh --venv /srv/tidings/.venv   # use a venv that already has tidings
#
# Options:
#   --venv PATH     use this virtualenv (must contain bin/tidings) instead of /opt/tidings/venv
#   --role ROLE     what runs on this host: all (hub shards and workers, the default), hubs, or
#                   workers
#   --hubs N        hub shards in the deployment (1 to 64, default 1), the same on every host;
#                   roles all and hubs enable tidings-hub@0..N-1 here (and disable @N and up)
#   --workers N     worker instances to enable (default: the number of CPUs; none with role hubs)
#   --no-sysctl     install /etc/sysctl.d/90-tidings.conf but do not apply it now
#   --no-enable     install the units but enable nothing
# --role and --hubs go into a new /etc/tidings/tidings.env (TIDINGS_ROLE, TIDINGS_HUBS). An
# existing one is never rewritten: it supplies them, and a different --role or --hubs is refused
# until you edit it (the shard count changes on every host at once, and endpoint lists with it).
# An install with the single tidings-hub.service of earlier versions is migrated: that unit is
# stopped, disabled and removed (its drop-ins move to tidings-hub@.service.d), and if it was
# running, this host's tidings-hub@ shards are started in its place (a hub restart).
# Environment:
#   DESTDIR=DIR     stage everything under DIR (for packaging and tests): no sysctl, no
#                   daemon-reload, no chown unless root; needs --venv (the path as seen at run time)
#   PREFIX=DIR      where the default venv goes (default /opt/tidings)
#   PYTHON=python3  the interpreter the default venv is made from (3.11 or newer)
#   TIDINGS_ROLE, TIDINGS_HUBS   the same as --role, --hubs (the options win)
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
ROLE=${TIDINGS_ROLE:-}
HUBS=${TIDINGS_HUBS:-}
MAX_HUBS=64   # tidings.config.MAX_HUBS
APPLY_SYSCTL=1
ENABLE=1
SERVICE_USER=tidings
UNITDIR=/etc/systemd/system
CONFDIR=/etc/tidings
ENVFILE=$CONFDIR/tidings.env
SYSCTL_FILE=/etc/sysctl.d/90-tidings.conf

say() { printf 'install: %s\n' "$*"; }
span() {  # $1: unit prefix, $2: instance count -> "prefix@0" or "prefix@0..N-1"
    if [ "$2" -eq 1 ]; then echo "$1@0"; else echo "$1@0..$(($2 - 1))"; fi
}
warn() { printf 'install: warning: %s\n' "$*" >&2; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --venv) [ $# -ge 2 ] || die "--venv needs a path"; VENV=$2; shift 2 ;;
        --venv=*) VENV=${1#--venv=}; shift ;;
        --workers) [ $# -ge 2 ] || die "--workers needs a number"; WORKERS=$2; shift 2 ;;
        --workers=*) WORKERS=${1#--workers=}; shift ;;
        --role) [ $# -ge 2 ] || die "--role needs all, hubs or workers"; ROLE=$2; shift 2 ;;
        --role=*) ROLE=${1#--role=}; shift ;;
        --hubs) [ $# -ge 2 ] || die "--hubs needs a number"; HUBS=$2; shift 2 ;;
        --hubs=*) HUBS=${1#--hubs=}; shift ;;
        --no-sysctl) APPLY_SYSCTL=0; shift ;;
        --no-enable) ENABLE=0; shift ;;
        -h|--help) sed -n '/^set -eu$/q; 2,$p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

# -- 0. role and shards: the options, or an existing env file, which they must agree with -------
env_value() {  # the last VAR=value of $1 in the env file, or $2
    v=""
    [ ! -e "$DESTDIR$ENVFILE" ] || v=$(sed -n "s/^$1=//p" "$DESTDIR$ENVFILE" | tail -n 1)
    case "$v" in  # quoted, as systemd allows
        \"*\"|\'*\') v=${v#?}; v=${v%?} ;;
    esac
    echo "${v:-$2}"
}
check_role() {  # $1: a role, $2: where it came from
    case "$1" in
        all|hubs|workers) ;;
        *) die "$2: the role is all, hubs or workers, not '$1'" ;;
    esac
}
check_hubs() {  # $1: a shard count, $2: where it came from
    case "$1" in
        ''|*[!0-9]*) die "$2 wants a whole number, not '$1'" ;;
    esac
    if [ "$1" -lt 1 ] || [ "$1" -gt "$MAX_HUBS" ]; then die "$2 must be 1 to $MAX_HUBS, not $1"; fi
}
[ -z "$ROLE" ] || check_role "$ROLE" "--role"
[ -z "$HUBS" ] || check_hubs "$HUBS" "--hubs"
if [ -e "$DESTDIR$ENVFILE" ]; then
    # What the services will run with; written by the operator, maybe copied from another host.
    file_role=$(env_value TIDINGS_ROLE all)
    file_hubs=$(env_value TIDINGS_HUBS 1)
    check_role "$file_role" "TIDINGS_ROLE in $ENVFILE"
    check_hubs "$file_hubs" "TIDINGS_HUBS in $ENVFILE"
    if [ -n "$ROLE" ] && [ "$ROLE" != "$file_role" ]; then
        die "role $ROLE, but $ENVFILE says TIDINGS_ROLE=$file_role: set TIDINGS_ROLE=$ROLE there first (this script never rewrites it)"
    fi
    if [ -n "$HUBS" ] && [ "$HUBS" != "$file_hubs" ]; then
        die "$HUBS hub shards, but $ENVFILE says TIDINGS_HUBS=$file_hubs: set TIDINGS_HUBS=$HUBS there first, on every host, with one TIDINGS_HUB_INGRESS/EGRESS/REQUESTS entry per shard if listed"
    fi
    ROLE=$file_role
    HUBS=$file_hubs
fi
ROLE=${ROLE:-all}
HUBS=${HUBS:-1}
RUNS_HUBS=0
RUNS_WORKERS=0
[ "$ROLE" = workers ] || RUNS_HUBS=1
[ "$ROLE" = hubs ] || RUNS_WORKERS=1

if [ "$RUNS_WORKERS" -eq 0 ]; then
    [ -z "$WORKERS" ] || warn "--workers $WORKERS ignored: role hubs runs no workers"
    WORKERS=0
else
    if [ -z "$WORKERS" ]; then
        WORKERS=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
    fi
    case "$WORKERS" in
        ''|*[!0-9]*) die "--workers wants a whole number, not '$WORKERS'" ;;
    esac
    [ "$WORKERS" -ge 1 ] || die "--workers must be at least 1"
fi
if [ "$RUNS_HUBS" -eq 1 ]; then here=$(span tidings-hub "$HUBS"); else here="no hub"; fi
say "role $ROLE, $HUBS hub shard(s) in the deployment: here $here and $WORKERS worker(s)"

# -- 1. the service user -------------------------------------------------------------------
# One static user for the hub shards and every worker: SO_REUSEPORT needs the same UID across the
# group, and the ipc:// sockets in /run/tidings are private to it.
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
# Every unit on every host, whatever the role: step 6 enables the instances that run here.
for unit in tidings-hub@.service tidings-hubs.target tidings-worker@.service tidings.target; do
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
                      -e "s/^#\{0,1\}TIDINGS_ROLE=.*/TIDINGS_ROLE=$ROLE/" \
                      -e "s/^#\{0,1\}TIDINGS_HUBS=.*/TIDINGS_HUBS=$HUBS/" \
                      "$SRC/tidings.env.example" > "$tmp")
    mv -f "$tmp" "$DESTDIR$ENVFILE"
    say "created $DESTDIR$ENVFILE with a new JWT secret and API key, TIDINGS_ROLE=$ROLE, TIDINGS_HUBS=$HUBS"
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
# Hub links: tcp:// needs CURVE keys, and each role its own key files (see tidings.env.example).
keys=$(env_value TIDINGS_HUB_KEYS "")
if [ -n "$keys" ]; then
    missing=""
    if [ "$RUNS_HUBS" -eq 1 ]; then
        [ -e "$DESTDIR$keys/hub.key_secret" ] || missing="$missing hub.key_secret"
    fi
    if [ "$RUNS_WORKERS" -eq 1 ]; then
        [ -e "$DESTDIR$keys/hub.key" ] || [ -e "$DESTDIR$keys/hub.key_secret" ] || missing="$missing hub.key"
        [ -e "$DESTDIR$keys/host.key_secret" ] || missing="$missing host.key_secret"
    fi
    [ -z "$missing" ] || warn "TIDINGS_HUB_KEYS=$keys lacks$missing for role $ROLE: the services will refuse to start (the comments in $ENVFILE say which host needs which)"
elif grep -Eq '^TIDINGS_HUB_(INGRESS|EGRESS|REQUESTS)=.*tcp://' "$DESTDIR$ENVFILE"; then
    case "$(env_value TIDINGS_HUB_INSECURE 0)" in
        1|true|yes|on) warn "tcp:// hub links WITHOUT encryption (TIDINGS_HUB_INSECURE): a private test network only" ;;
        *) warn "tcp:// hub endpoints without TIDINGS_HUB_KEYS: the services will refuse to start" ;;
    esac
fi
if [ "$ROLE" != all ] && ! grep -Eq '^TIDINGS_HUB_(INGRESS|EGRESS|REQUESTS)=.*tcp://' "$DESTDIR$ENVFILE"; then
    warn "role $ROLE, but the hub endpoints are ipc:// sockets on this host: list the hubs' tcp:// endpoints in TIDINGS_HUB_INGRESS/EGRESS/REQUESTS"
fi
# The configuration as the services will read it: `tidings config` refuses what they would (an
# unknown value, endpoint lists that do not match TIDINGS_HUBS) and says where each shard is
# (the rest of its topology lines is about `tidings run`).
if check=$(env -i PATH="$PATH" TIDINGS_RUNTIME_DIR=/run/tidings TIDINGS_ENV_FILE="$DESTDIR$ENVFILE" \
           "$VENV/bin/tidings" config 2>&1); then
    printf '%s\n' "$check" | sed -n 's/^  \(hub [0-9]*: \)/install: \1/p'
else
    warn "the services will refuse this configuration: $(printf '%s\n' "$check" | tail -n 1)"
fi

# -- 5. kernel settings ----------------------------------------------------------------------
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
LIVE=0  # a running systemd to talk to
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then LIVE=1; fi
instances() {  # $1: unit prefix, $2: count -> "prefix@0.service ... prefix@N-1.service"
    i=0
    while [ "$i" -lt "$2" ]; do
        printf '%s@%s.service ' "$1" "$i"
        i=$((i + 1))
    done
}

# The single hub unit of earlier versions gives way to the shards, tidings-hub@N.
OLD_HUB=tidings-hub.service
old_hub_was_running=0
old_hub_removed=0
if [ -e "$DESTDIR$UNITDIR/$OLD_HUB" ] || [ -L "$DESTDIR$UNITDIR/$OLD_HUB" ]; then
    if [ "$LIVE" -eq 1 ] && systemctl is-active --quiet "$OLD_HUB"; then
        old_hub_was_running=1
        systemctl stop "$OLD_HUB"
        say "stopped $OLD_HUB"
    fi
    $SYSTEMCTL disable --quiet "$OLD_HUB" 2>/dev/null || true
    for link in "$DESTDIR$UNITDIR"/*.wants/"$OLD_HUB" "$DESTDIR$UNITDIR"/*.requires/"$OLD_HUB"; do
        [ ! -L "$link" ] || rm -f "$link"
    done
    dropins="$DESTDIR$UNITDIR/$OLD_HUB.d"
    if [ -d "$dropins" ]; then
        if [ -e "$DESTDIR$UNITDIR/tidings-hub@.service.d" ]; then
            warn "kept $dropins: tidings-hub@.service.d exists already, merge them by hand"
        else
            mv "$dropins" "$DESTDIR$UNITDIR/tidings-hub@.service.d"
            say "moved the drop-ins of $OLD_HUB to tidings-hub@.service.d (every shard)"
        fi
    fi
    rm -f "$DESTDIR$UNITDIR/$OLD_HUB"
    old_hub_removed=1
    say "removed $OLD_HUB: the hub shards are tidings-hub@0..N-1 now"
fi

if [ "$LIVE" -eq 1 ]; then
    systemctl daemon-reload
    [ "$old_hub_removed" -eq 0 ] || systemctl reset-failed "$OLD_HUB" 2>/dev/null || true
fi
disable_from() {  # $1: unit prefix, $2: the target it is WantedBy=, $3: the first instance to disable
    for link in "$DESTDIR$UNITDIR/$2.wants/$1"@*.service; do
        [ -e "$link" ] || [ -L "$link" ] || continue
        n=${link##*@}
        n=${n%.service}
        case "$n" in ''|*[!0-9]*) continue ;; esac
        if [ "$n" -ge "$3" ]; then
            $SYSTEMCTL disable --quiet "$1@$n.service"
            say "disabled $1@$n.service"
        fi
    done
}
if [ "$ENABLE" -eq 1 ]; then
    units="tidings.target"
    [ "$RUNS_HUBS" -eq 0 ] || units="$units $(instances tidings-hub "$HUBS")"
    [ "$RUNS_WORKERS" -eq 0 ] || units="$units $(instances tidings-worker "$WORKERS")"
    # shellcheck disable=SC2086
    $SYSTEMCTL enable --quiet $units
    # Fewer shards or workers than last time, or another role: disable the extra instances (a
    # running one keeps running).
    disable_from tidings-hub tidings-hubs.target "$((RUNS_HUBS * HUBS))"
    disable_from tidings-worker tidings.target "$WORKERS"
    enabled="tidings.target"
    [ "$RUNS_HUBS" -eq 0 ] || enabled="$enabled, $(span tidings-hub "$HUBS")"
    [ "$RUNS_WORKERS" -eq 0 ] || enabled="$enabled, $(span tidings-worker "$WORKERS")"
    say "enabled $enabled"
fi
if [ "$old_hub_was_running" -eq 1 ]; then
    if [ "$RUNS_HUBS" -eq 1 ]; then
        # shellcheck disable=SC2046
        systemctl start $(instances tidings-hub "$HUBS")
        say "started $(span tidings-hub "$HUBS") in place of $OLD_HUB"
    else
        warn "$OLD_HUB was running; role $ROLE runs no hub here: the workers use the hubs $ENVFILE names"
    fi
fi

cat <<EOF

Done. Next:
  review $ENVFILE (TIDINGS_HOST, TIDINGS_ALLOWED_ORIGINS, ...)
EOF
if [ "$ROLE" != all ]; then
    cat <<EOF
  several hosts: the same TIDINGS_HUBS and TIDINGS_HUB_INGRESS/EGRESS/REQUESTS on each, and
    TIDINGS_HUB_KEYS with this role's key files (the comments in $ENVFILE say which)
EOF
fi
cat <<EOF
  systemctl start tidings.target
  systemctl status 'tidings-*'  ·  journalctl -u 'tidings-*' -f
EOF
