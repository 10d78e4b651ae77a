#!/usr/bin/env node
// bench/peer/run.js -- the peer of `make bench`: graphile-worker draining
// JOBS no-op jobs at CONCURRENCY, measured the way bench/run.lua measures
// bmdb-host.
//
//   node run.js JOBS CONCURRENCY default|batched
//
// The database comes from the usual libpq-style variables (PGHOST = the
// socket directory, PGPORT, PGUSER, PGDATABASE). The runner starts idle (its
// schema migrated), then the jobs are added in one statement; the clock
// starts when that statement has returned, and stops when every job has
// succeeded and its row is gone. The result is one line on stdout:
//
//   result jobs=N seconds=S cpu=C rss=R dbcpu=D
//
// (cpu: this process's user+system seconds during the drain; rss: its peak
// resident set in bytes; dbcpu: the database server's CPU seconds during
// the drain, counted as bench/run.lua counts it, given the postmaster's
// pid in BENCH_PGPID and the clock tick in BENCH_CLK_TCK; 0 without
// them). It exits non-zero, with the reason on stderr, if anything fails
// or the jobs are not done within TIMEOUT seconds (default 300): a bench
// run always stops by itself.
"use strict";

function usage(msg) {
  process.stderr.write(`run.js: ${msg}\nusage: node run.js JOBS CONCURRENCY default|batched\n`);
  process.exit(2);
}

function options(argv) {
  const jobs = Number(argv[2]);
  const concurrency = Number(argv[3]);
  const mode = argv[4];
  if (!Number.isInteger(jobs) || jobs < 1) usage("JOBS must be a positive integer");
  if (!Number.isInteger(concurrency) || concurrency < 1) usage("CONCURRENCY must be a positive integer");
  if (mode !== "default" && mode !== "batched") usage("the mode must be default or batched");
  const timeout = Number(process.env.TIMEOUT || 300);
  return { jobs, concurrency, mode, timeout };
}

// A URL naming the socket directory: node-postgres reads `host` from the
// query string, so no TCP port is ever opened.
function connectionString() {
  const host = process.env.PGHOST;
  const db = process.env.PGDATABASE;
  if (!host || !db) usage("PGHOST and PGDATABASE must be set");
  const user = encodeURIComponent(process.env.PGUSER || "postgres");
  const port = process.env.PGPORT || "5432";
  return `postgres://${user}@/${encodeURIComponent(db)}?host=${encodeURIComponent(host)}&port=${port}`;
}

// graphile-worker's settings for a mode. `default` keeps its defaults except
// the pool, sized as its documentation asks (10 or concurrency + 2,
// whichever is larger) so slots do not wait for a connection; `batched`
// adds its batching: a local queue of 500 and completions batched with no
// delay.
function preset(opts, conn) {
  const worker = {
    connectionString: conn,
    concurrentJobs: opts.concurrency,
    maxPoolSize: Math.max(10, opts.concurrency + 2),
  };
  if (opts.mode === "batched") {
    worker.localQueue = { size: 500 };
    worker.completeJobBatchDelay = 0;
  }
  return { worker };
}

// The database server's CPU seconds so far: the postmaster's own and its
// reaped children's, and every live child's (bench/run.lua's server_cpu).
function serverCpu() {
  const pm = Number(process.env.BENCH_PGPID);
  const tick = Number(process.env.BENCH_CLK_TCK) || 100;
  if (!pm) return 0;
  const fs = require("fs");
  let total = 0;
  for (const name of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    let stat;
    try { stat = fs.readFileSync(`/proc/${name}/stat`, "utf8"); } catch (e) { continue; }
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" "); // f[1] ppid, f[11..14] times
    if (Number(name) === pm) total += Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]);
    else if (Number(f[1]) === pm) total += Number(f[11]) + Number(f[12]);
  }
  return total / tick;
}

async function main() {
  const opts = options(process.argv);
  const conn = connectionString();
  // Required after the arguments are checked, so they are checked even
  // where the packages are not installed (`make check`).
  const { run, makeWorkerUtils } = require("graphile-worker");
  const deadline = setTimeout(() => {
    process.stderr.write(`run.js: the ${opts.jobs} jobs were not done within ${opts.timeout} s\n`);
    process.exit(1);
  }, opts.timeout * 1000);

  const utils = await makeWorkerUtils({ connectionString: conn });
  await utils.migrate();
  await utils.withPgClient((c) => c.query("DELETE FROM graphile_worker._private_jobs"));

  let succeeded = 0;
  let allSucceeded;
  const done = new Promise((resolve) => { allSucceeded = resolve; });
  const runner = await run({
    noHandleSignals: true,
    taskList: { noop: async () => {} },
    preset: preset(opts, conn),
  });
  runner.events.on("job:success", () => {
    succeeded += 1;
    if (succeeded === opts.jobs) allSucceeded();
  });

  const specs = [];
  for (let i = 0; i < opts.jobs; i++) specs.push({ identifier: "noop", payload: {} });
  await utils.addJobs(specs);
  const cpu0 = process.cpuUsage();
  const db0 = serverCpu();
  const t0 = process.hrtime.bigint();

  await done;
  // Batched completions reach the database a moment after the event.
  for (;;) {
    const r = await utils.withPgClient((c) => c.query("SELECT count(*)::int AS n FROM graphile_worker._private_jobs"));
    if (r.rows[0].n === 0) break;
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  const dbcpu = serverCpu() - db0;

  await runner.stop();
  await utils.release();
  clearTimeout(deadline);
  const rss = process.resourceUsage().maxRSS * 1024;
  process.stdout.write(`result jobs=${opts.jobs} seconds=${seconds.toFixed(4)} ` +
    `cpu=${((cpu.user + cpu.system) / 1e6).toFixed(4)} rss=${rss} dbcpu=${dbcpu.toFixed(4)}\n`);
}

main().catch((err) => {
  process.stderr.write(`run.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
