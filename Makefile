# bmdb-host: build, test, run. `make run` and `make check` install whatever
# Debian packages are missing first, so a fresh machine needs nothing else.

PKGS      := luajit libpq uuid libmicrohttpd libsystemd libcurl
DEB_PKGS  := build-essential pkg-config luajit libluajit-5.1-dev libpq-dev \
             uuid-dev lua-busted postgresql libmicrohttpd-dev libsystemd-dev \
             libcurl4-openssl-dev
PREFIX    ?= /usr/local

# CFLAGS is the caller's (make CFLAGS='-O1 -fsanitize=address' ...); the
# flags the code needs are kept apart so an override cannot drop them.
CFLAGS    ?= -O2 -g
BUILD     ?= build
BASE_CFLAGS := -std=gnu11 -Wall -Wextra -pthread -fPIC
# host/ is searched for #include "..." only: its sched.h must not hide the
# system <sched.h> that <pthread.h> includes.
override CPPFLAGS += -iquote host -I$(BUILD) $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
override LDLIBS += $(shell pkg-config --libs $(PKGS) 2>/dev/null) -pthread
# The Lua C module takes LuaJIT from the interpreter that loads it.
MOD_LIBS  := $(shell pkg-config --libs libpq uuid libmicrohttpd libsystemd libcurl 2>/dev/null) -pthread

CORE_SRC  := $(filter-out host/main.c,$(wildcard host/*.c))
CORE_OBJ  := $(CORE_SRC:host/%.c=$(BUILD)/%.o) $(BUILD)/bundle.o
LUA_SRC   := $(shell find lua -name '*.lua' | sort)
MIGRATIONS:= $(sort $(wildcard migrations/*.sql))

BUSTED    := busted --lua=luajit

.PHONY: all deps check-deps bench-deps bench-io run check check-asan asan-host check-tsan tsan-host check-all bench install clean

all: $(BUILD)/bmdb-host $(BUILD)/bmdb/core.so $(BUILD)/fake-provider

# Installs only what is missing; silent when everything is there.
deps:
	@missing=; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(BUILD)/bundle.c: host/embed.lua $(LUA_SRC) $(MIGRATIONS) | $(BUILD)
	luajit host/embed.lua $@ $(LUA_SRC) $(MIGRATIONS)

$(BUILD)/%.o: host/%.c $(wildcard host/*.h) | $(BUILD)
	$(CC) $(CPPFLAGS) $(BASE_CFLAGS) $(CFLAGS) -c -o $@ $<

$(BUILD)/bundle.o: $(BUILD)/bundle.c host/lstate.h host/migrate.h
	$(CC) $(CPPFLAGS) $(BASE_CFLAGS) $(CFLAGS) -c -o $@ $<

$(BUILD)/bmdb-host: $(BUILD)/main.o $(CORE_OBJ)
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -o $@ $^ $(LDFLAGS) $(LDLIBS)

$(BUILD)/bmdb/core.so: $(CORE_OBJ) | $(BUILD)
	@mkdir -p $(BUILD)/bmdb
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -shared -o $@ $^ $(LDFLAGS) $(MOD_LIBS)

# The fake provider's HTTP server (examples/fake-provider/): libc only.
$(BUILD)/fake-provider: examples/fake-provider/fake-provider.c | $(BUILD)
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -o $@ $< $(LDFLAGS)

# The benchmark's baseline HTTP client, a plain libcurl loop: built for
# `make bench` only.
$(BUILD)/curl-loop: bench/curl_loop.c | $(BUILD)
	$(CC) $(BASE_CFLAGS) $(CFLAGS) $(shell pkg-config --cflags libcurl 2>/dev/null) -o $@ $< \
	  $(LDFLAGS) $(shell pkg-config --libs libcurl 2>/dev/null)

$(BUILD):
	@mkdir -p $(BUILD)

# The specs alone need a browser: spec/http_spec.lua loads the status page
# in headless Chromium (Debian's chromium), installed only for them; and
# SPEC_DEB_PKGS: pgbouncer for spec/pooler_spec.lua, patroni and
# etcd-server for the failover cluster of spec/fault/patroni_spec.lua.
SPEC_DEB_PKGS := pgbouncer patroni etcd-server
check-deps: deps
	@missing=; for p in $(SPEC_DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing (for the specs)"; \
	  sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@command -v chromium >/dev/null || { \
	  echo "installing: chromium (for the status page spec)"; \
	  sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# The example provisioner on the embedded default database (.bmdb/),
# against the fake provider on its default port (examples/provider.lua),
# which is started first and stopped when the recipe's shell exits (the
# trap) or dies (--die-with-parent). Until Ctrl-C.
run: deps
	@$(MAKE) --no-print-directory all
	./build/fake-provider --port 8099 --die-with-parent >build/fake-provider.out & provider=$$!; \
	trap 'kill $$provider 2>/dev/null' EXIT; \
	n=0; until grep -q '^listening' build/fake-provider.out; do \
	  kill -0 $$provider 2>/dev/null && [ $$n -lt 100 ] || { echo "the fake provider did not start" >&2; exit 1; }; \
	  n=$$((n + 1)); sleep 0.1; \
	done; \
	./build/bmdb-host --migrations examples/migrations examples/seed.lua 5 && \
	./build/bmdb-host --migrations examples/migrations examples/provisioner.lua

# The specs (spec/, spec/fault/ and the operator example in examples/, as
# .busted lists them), against PostgreSQL servers the specs start
# themselves; the slow fault specs (tagged #slow: load, failover, soak) are
# left to check-all, so this stays within a few minutes.
check: check-deps
	@$(MAKE) --no-print-directory all
	$(BUSTED) --exclude-tags=slow $(BUSTED_ARGS)

# The specs again, the binary built with AddressSanitizer (leak checks on)
# and UndefinedBehaviorSanitizer (any report halts the host): a memory
# error, a leak or undefined behaviour makes the host exit non-zero, which
# fails the spec that ran it, with the report in the host's log. The
# in-process specs load the ordinary module (a sanitized module would need
# libasan preloaded into LuaJIT, and through it into every PostgreSQL the
# specs start).
SAN_FLAGS   := -fsanitize=address,undefined
ASAN_CFLAGS := -O1 -g $(SAN_FLAGS) -fno-omit-frame-pointer -DBMDB_LOCKCHECK
ASAN_ENV    := BMDB_HOST_BIN=$(CURDIR)/build/asan/bmdb-host ASAN_OPTIONS=detect_leaks=1 \
               UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
asan-host:
	@$(MAKE) --no-print-directory BUILD=build/asan CFLAGS='$(ASAN_CFLAGS)' \
	  LDFLAGS='$(SAN_FLAGS)' build/asan/bmdb-host

check-asan: check-deps
	@$(MAKE) --no-print-directory all asan-host
	$(ASAN_ENV) $(BUSTED) --exclude-tags=slow $(BUSTED_ARGS)

# The specs that exercise the host's threads (batches, claims, the
# listener, shutdown, the HTTP server), against a bmdb-host built with
# ThreadSanitizer: a data race in the C core makes the host exit 66. Not
# part of check-all: the host runs several times slower, and the fault
# specs' timing margins are set for the ordinary build. Thread leaks are
# not reported (a slot stuck in C is left behind at exit by design), and
# spec/support/tsan.supp holds the one known false positive.
TSAN_FLAGS  := -fsanitize=thread
TSAN_SPECS  := spec/worker_spec.lua spec/transact_spec.lua spec/session_spec.lua spec/work_spec.lua \
               spec/fencing_spec.lua spec/control_spec.lua spec/shutdown_spec.lua spec/http_spec.lua \
               spec/http_auth_spec.lua
tsan-host:
	@$(MAKE) --no-print-directory BUILD=build/tsan CFLAGS='-O1 -g $(TSAN_FLAGS) -fno-omit-frame-pointer -DBMDB_LOCKCHECK' \
	  LDFLAGS='$(TSAN_FLAGS)' build/tsan/bmdb-host

check-tsan: check-deps
	@$(MAKE) --no-print-directory all tsan-host
	BMDB_HOST_BIN=$(CURDIR)/build/tsan/bmdb-host \
	  TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_thread_leaks=0 suppressions=$(CURDIR)/spec/support/tsan.supp" \
	  $(BUSTED) $(or $(BUSTED_ARGS),$(TSAN_SPECS))

# Everything: every spec including the slow fault specs, first against the
# ordinary build, then against the sanitized one; each fault spec appends
# its counts to $(FIGURES) and the table is printed at the end. Fails if
# either run failed.
FIGURES := $(CURDIR)/build/figures.tsv
check-all: check-deps
	@$(MAKE) --no-print-directory all asan-host
	@rm -f $(FIGURES)
	@status=0; \
	BMDB_FIGURES=$(FIGURES) BMDB_FIGURES_RUN=plain $(BUSTED) $(BUSTED_ARGS) || status=1; \
	BMDB_FIGURES=$(FIGURES) BMDB_FIGURES_RUN=asan $(ASAN_ENV) $(BUSTED) $(BUSTED_ARGS) || status=1; \
	luajit spec/fault/figures.lua $(FIGURES); \
	exit $$status

# The benchmark (bench/run.lua; figures into BENCHMARKS.md, nothing
# asserted). Only it needs Node.js: bench-deps installs Debian's nodejs and
# npm when `node` or `npm` is missing, and the peer's pinned packages
# (bench/peer/package-lock.json). pgbench and pg_stat_statements come with
# the postgresql package.
bench-deps: deps
	@missing=; command -v node >/dev/null || missing=nodejs; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@cd bench/peer && if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then \
	  npm ci --no-audit --no-fund --loglevel=error; fi

bench: bench-deps
	@$(MAKE) --no-print-directory all $(BUILD)/curl-loop $(BUILD)/spawn-loop
	luajit bench/run.lua
	luajit bench/io.lua

# Body I/O alone (bench/io.lua): abort latency, bmdb.http and bmdb.exec
# against plain C loops.
bench-io: deps
	@$(MAKE) --no-print-directory all $(BUILD)/curl-loop $(BUILD)/spawn-loop
	luajit bench/io.lua

# posix_spawn's own rate, the baseline of bmdb.exec's in bench/io.lua.
$(BUILD)/spawn-loop: bench/spawn_loop.c | $(BUILD)
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -o $@ $<

# The binary carries its Lua library; the module files are installed too so
# operators' busted specs can `require "bmdb.testing"` under LuaJIT.
LUA_SHARE ?= $(PREFIX)/share/lua/5.1
LUA_LIB   ?= $(PREFIX)/lib/lua/5.1

install: all
	install -D -m 0755 build/bmdb-host $(DESTDIR)$(PREFIX)/bin/bmdb-host
	install -D -m 0644 lua/bmdb.lua $(DESTDIR)$(LUA_SHARE)/bmdb.lua
	# every module: a list by name forgot new ones
	for f in lua/bmdb/*.lua; do install -D -m 0644 $$f $(DESTDIR)$(LUA_SHARE)/bmdb/$${f##*/} || exit 1; done
	install -D -m 0755 build/bmdb/core.so $(DESTDIR)$(LUA_LIB)/bmdb/core.so

clean:
	rm -rf build
