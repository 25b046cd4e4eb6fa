# Shared by bin/run-tests and bin/quickstart: the virtualenv and local services.
# Sourced, not run.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "Creating the virtualenv in $VENV"
        python3 -m venv "$VENV" || { echo "python3 -m venv failed: install Python 3.11 with venv (Debian: apt-get install python3-venv)" >&2; exit 1; }
    fi
    local stamp="$VENV/.requirements.sha256"
    local wanted
    wanted="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
        echo "Installing requirements.txt"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/requirements.txt" || { echo "pip install -r requirements.txt failed" >&2; exit 1; }
        echo "$wanted" > "$stamp"
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
}

wait_for() {
    local what="$1" seconds="$2"
    shift 2
    for _ in $(seq 1 "$((seconds * 4))"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    echo "$what did not respond within ${seconds} s" >&2
    return 1
}

postgres_answers() { pg_isready -q -h 127.0.0.1 -p 5432; }
redis_answers() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }

install_debian_packages() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "Missing $*; install them with your package manager." >&2
        exit 1
    fi
    echo "Installing Debian packages: $*"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || {
        echo "apt-get install $* failed; install them by hand and run this again." >&2
        exit 1
    }
}

ensure_postgres() {
    if postgres_answers; then return 0; fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        install_debian_packages postgresql postgresql-client
    fi
    echo "Starting PostgreSQL"
    local version
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for "PostgreSQL on 127.0.0.1:5432" 30 postgres_answers || {
        echo "Start PostgreSQL 15 on 127.0.0.1:5432 with trust auth for user postgres, or set TEST_DATABASE_URL." >&2
        exit 1
    }
}

ensure_redis() {
    if redis_answers; then return 0; fi
    if ! command -v redis-server >/dev/null 2>&1; then
        install_debian_packages redis-server redis-tools
    fi
    echo "Starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_for "Redis on 127.0.0.1:6379" 15 redis_answers || {
        echo "Start Redis on 127.0.0.1:6379, or set TEST_REDIS_URL." >&2
        exit 1
    }
}
