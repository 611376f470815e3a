-- wrk script: POST a message to one session after another, round-robin.
--
-- Environment (set by bench/loadgen.py):
--   BENCH_PATHS  file with one request path a line (/v1/sessions/<id>/messages)
--   BENCH_TOKEN  bearer token for the bridge (the passthrough ignores it, but
--                gets the same bytes so both targets parse the same request)
--   BENCH_BODY   the JSON body
--   BENCH_BODIES optional: file with one JSON body a line, the n-th sent with
--                the n-th path (a body per request, e.g. each naming its own
--                conversation on POST /v1/responses); else BENCH_BODY for all
--   BENCH_LIMIT  optional: stop after this many messages have been answered
--                (each path is then used at most once when LIMIT <= #paths);
--                the line "BENCH_LIMIT_REACHED" tells loadgen.py to end wrk
--
-- done() prints one line "BENCH_JSON {...}" with the figures loadgen.py reads.

local paths = {}
for line in io.lines(os.getenv("BENCH_PATHS")) do
  if #line > 0 then paths[#paths + 1] = line end
end

local headers = {
  ["Content-Type"] = "application/json",
  ["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN"),
}
local body = os.getenv("BENCH_BODY")
local bodies = {}
local bodies_file = os.getenv("BENCH_BODIES")
if bodies_file and #bodies_file > 0 then
  for line in io.lines(bodies_file) do
    if #line > 0 then bodies[#bodies + 1] = line end
  end
end
local limit = tonumber(os.getenv("BENCH_LIMIT") or "")

-- Formatting every request once, up front, keeps wrk's own per-request work
-- down to a table lookup, so the generator is not what is measured. It happens
-- in init(), where wrk.host (for the Host header) is known.
local requests = {}
local issued = 0
-- Once every limited message is sent, idle connections ask for /healthz until
-- the last answers arrive; those fillers are not counted as messages.
local filler

init = function(args)
  for i, path in ipairs(paths) do
    requests[i] = wrk.format("POST", path, headers, bodies[i] or body)
  end
  filler = wrk.format("GET", "/healthz")
end

-- wrk calls request() once after init() only to check the script (it counts
-- the requests returned); that call must not use up a session's turn.
local checked = false

request = function()
  if not checked then
    checked = true
    return requests[1]
  end
  if limit and issued >= limit then
    return filler
  end
  issued = issued + 1
  return requests[(issued - 1) % #requests + 1]
end

if limit then
  local answered = 0
  response = function(status, headers, body)
    -- /healthz answers {"status": ...}; a message's answer, a response or an
    -- error never does.
    if body:sub(1, 10) ~= '{"status":' then
      answered = answered + 1
      if answered == limit then
        -- wrk's main thread sleeps out the whole duration whatever the
        -- threads do, so loadgen.py interrupts wrk when it reads this line.
        io.write("BENCH_LIMIT_REACHED\n")
        io.flush()
        wrk.thread:stop()
      end
    end
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d,'
      .. ' "mean_us": %.1f, "max_us": %d, "http_errors": %d, "connect_errors": %d,'
      .. ' "read_errors": %d, "write_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
