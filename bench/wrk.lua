-- wrk script: POST the body in $BENCH_BODY with $BENCH_HEADERS ("Name: value|Name: value")
-- and print one JSON line of results at the end.
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
for pair in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^|]+") do
  local name, value = string.match(pair, "^%s*(.-)%s*:%s*(.-)%s*$")
  if name then wrk.headers[name] = value end
end

function done(summary, latency, requests)
  local points = {}
  for p = 1, 99 do points[#points + 1] = p end
  points[#points + 1] = 99.9
  local parts = {}
  for _, p in ipairs(points) do
    parts[#parts + 1] = string.format('"%g":%d', p, latency:percentile(p))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{%s},"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ","), latency.mean, latency.max))
end
