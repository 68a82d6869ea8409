#!/usr/bin/env bash
# Tether's test command: installs and starts what the tests need, then runs every test.
#
#   ./scripts/test.sh            # everything (what CI runs): bench smoke run, then every test
#   ./scripts/test.sh --test X   # extra arguments go to `cargo test` (the smoke run is skipped)
#
# What it makes sure of, idempotently:
#   - Redis on 127.0.0.1:6379 and RabbitMQ on 127.0.0.1:5672 (started if installed but
#     stopped; installed with apt-get if missing);
#   - PostgreSQL on 127.0.0.1:5432 (started if installed but stopped; installed if
#     missing), for the instructions tests' databases;
#   - tansu (a Kafka-compatible broker) installed with cargo and listening on
#     127.0.0.1:9092 (its build is cached in ~/.cargo/bin);
#   - a Python venv in .venv with openagents==0.5.1 for the compatibility test;
#   - a Python venv in .venv-clients with the client library (`pip install ./clients/python`,
#     reinstalled every run) and its test tools (pytest, ruff, mypy);
#   - Debian's chromium and chromium-driver for the dashboard test (tests/dashboard.rs);
#   - Debian's prometheus (server and promtool) for the metrics tests (tests/observability.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
mkdir -p .cache
log() { printf 'test.sh: %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port seconds name
  for _ in $(seq 1 $(($2 * 10))); do port_open "$1" && return 0; sleep 0.1; done
  log "$3 did not start listening on 127.0.0.1:$1 within $2 s"; return 1
}
# --- Disk: a full disk shows up as the linker dying with SIGBUS (`ld terminated with
# signal 7`), not as "no space left". The debug target directory of a whole run is
# ≈ 5 GiB (4.6 GiB measured) and tansu's first build needs room of its own: warn early.
need_gib=8
read -r free_kib mount < <(df -Pk . 2>/dev/null | awk 'NR == 2 { print $4, $6 }') || true
if [[ ${free_kib:-} =~ ^[0-9]+$ ]] && [ "$free_kib" -lt $((need_gib * 1024 * 1024)) ]; then
  log "WARNING: only $((free_kib / 1024)) MiB free on $mount; a first run needs about ${need_gib} GiB. If the build fails with 'signal 7 [Bus error]', the disk filled: free some (old target directories, ~/.cargo/registry) and run again"
fi

apt_install() {
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq >&2; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# --- Redis ---
if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 20 Redis
fi

# --- RabbitMQ ---
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  log "starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_port 5672 90 RabbitMQ
fi

# --- PostgreSQL (the instructions tests create a database of their own on it) ---
if ! port_open 5432; then
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  log "starting PostgreSQL"
  for cluster in /etc/postgresql/*/main; do
    version=$(basename "$(dirname "$cluster")")
    pg_ctlcluster "$version" main start || true
  done
  wait_port 5432 30 PostgreSQL
fi
if command -v psql >/dev/null && ! psql -h 127.0.0.1 -U postgres -Atc 'select 1' >/dev/null 2>&1; then
  log "PostgreSQL on 127.0.0.1:5432 refuses user postgres without a password; the instructions tests need trust auth for it (or set TETHER_TEST_POSTGRES)"
fi

# --- Kafka (tansu) ---
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v tansu >/dev/null; then
  log "installing tansu (a Kafka-compatible broker; first build takes a while)"
  cargo install tansu --features dynostore --locked >&2
fi
if ! port_open 9092; then
  log "starting tansu on 127.0.0.1:9092"
  nohup tansu broker --listener-url tcp://127.0.0.1:9092 \
    --advertised-listener-url tcp://127.0.0.1:9092 \
    --storage-engine memory://tansu/ > .cache/tansu.log 2>&1 &
  wait_port 9092 30 tansu
fi
export TETHER_TEST_TANSU="$(command -v tansu)"

# --- OpenAgents 0.5.1 for the compatibility test ---
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import openagents' 2>/dev/null; then
  log "creating .venv with openagents==0.5.1"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check openagents==0.5.1 requests packaging >&2
fi
export TETHER_TEST_PYTHON="$root/.venv/bin/python"

# --- openssl (the Python client's wss test makes its certificate with it) ---
command -v openssl >/dev/null || apt_install openssl

# --- The Python client library (tether-agent) and its test tools ---
if [ ! -x .venv-clients/bin/python ] || ! .venv-clients/bin/python -c 'import pytest, mypy, ruff' 2>/dev/null; then
  log "creating .venv-clients with clients/python's test tools"
  python3 -m venv .venv-clients
  .venv-clients/bin/pip install -q --disable-pip-version-check -r clients/python/requirements-test.txt >&2
fi
# Installed as a user would (not editable), so every run checks that `pip install` works.
.venv-clients/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps ./clients/python >&2
.venv-clients/bin/pip install -q --disable-pip-version-check ./clients/python >&2
export TETHER_TEST_CLIENT_PYTHON="$root/.venv-clients/bin/python"

# --- Headless Chromium for the dashboard test (Debian's packages, never a downloaded browser) ---
command -v chromedriver >/dev/null || apt_install chromium chromium-driver
export TETHER_TEST_CHROMEDRIVER=/usr/bin/chromedriver

# --- Prometheus and promtool for the metrics tests (each test starts its own server) ---
command -v promtool >/dev/null && command -v prometheus >/dev/null || apt_install prometheus
export TETHER_TEST_PROMTOOL="$(command -v promtool)" TETHER_TEST_PROMETHEUS="$(command -v prometheus)"

if [ $# -eq 0 ]; then
  # The benchmark harness in its smoke configuration (a few hundred agents, seconds),
  # so it cannot rot; it asserts no speed, only that every workload could run.
  log "building, then running the benchmark smoke run"
  cargo build --workspace --bins --examples >&2
  target/debug/tether-bench smoke --out target/bench-smoke.md >&2
  # The fuzz targets are a workspace of their own (fuzz/, excluded from this one), so
  # nothing above compiles them: checked here, so that they follow the code they fuzz.
  log "checking that the fuzz targets compile"
  CARGO_TARGET_DIR="$root/target" cargo check --manifest-path fuzz/Cargo.toml --bins >&2
fi

log "running cargo test"
cargo test --workspace "$@"

if [ $# -eq 0 ]; then
  # The Python client library: its tests against the server binary (and the Rust
  # client's echo example as its peer), then its linters.
  log "running the Python client library's tests, ruff and mypy --strict"
  TETHER_BIN="$root/target/debug/tether" TETHER_RUST_ECHO="$root/target/debug/examples/echo" \
    .venv-clients/bin/python -m pytest -q clients/python/tests
  .venv-clients/bin/ruff check clients/python
  .venv-clients/bin/mypy --strict clients/python/src clients/python/tests clients/python/examples
fi
