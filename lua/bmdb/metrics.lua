-- bmdb/metrics.lua -- bmdb.metrics: an operator's own counters, gauges and
-- histograms on the host's /metrics (docs/operations.md, "Your own metrics").
--
--   counter(name, help, labels) -> c: c:inc([n,] ...)
--   gauge(name, help, labels) -> g: g:set(v, ...), g:inc([n,] ...), g:dec([n,] ...)
--   histogram(name, help, labels[, buckets]) -> h: h:observe(v, ...)
--
-- The registry and its rules are C (host/metrics.c, one per process, shared
-- by every Lua state); the calls are host/lmetrics.c's, handed out as they
-- are so that an error names the caller's line.
local core = require "bmdb.core"

return {
  counter = core.metric_counter,
  gauge = core.metric_gauge,
  histogram = core.metric_histogram,
}
