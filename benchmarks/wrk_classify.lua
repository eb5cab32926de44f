-- wrk script for benchmarks/loadgen.py: POST to the URL's path (/classify), one multipart upload (field `image`)
-- per request, cycling through the JPEG files listed in the script's first argument (one path a line). Prints one JSON line.
local bodies, index = {}, 0
local boundary = "----visionserve-load-test"
local headers = { ["Content-Type"] = "multipart/form-data; boundary=" .. boundary }

function init(args)
  for name, value in pairs(wrk.headers) do  -- wrk's -H headers (e.g. Authorization), kept beside ours
    if headers[name] == nil then headers[name] = value end
  end
  for path in io.lines(args[1]) do
    local file = assert(io.open(path, "rb"))
    local data = file:read("*a")
    file:close()
    bodies[#bodies + 1] = "--" .. boundary .. "\r\n"
      .. 'Content-Disposition: form-data; name="image"; filename="image.jpg"\r\n'
      .. "Content-Type: image/jpeg\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
  end
  index = math.random(#bodies)
end

function request()
  index = index % #bodies + 1
  return wrk.format("POST", wrk.path, headers, bodies[index])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, '
      .. '"p50_us": %d, "p95_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
