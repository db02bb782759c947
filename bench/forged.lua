-- Forged callbacks: bodies like the upstream's with a signature no key verifies. Eight
-- in ten go to real jobs' URLs (BENCH_FORGED names a file of "<path>" lines), one in
-- ten to a made-up job id (24 hex digits, like a real one, so the service looks it up),
-- one in ten to the instance-wide URL /callbacks. Each carries a unique
-- Elements-Webhook-Id. The answers' status codes are counted and printed at the end as
-- "status <code> <count>" lines.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
-- 32 bytes that are no key's HMAC of anything sent.
wrk.headers["Elements-Webhook-Signature"] = "sha256=Zm9yZ2VkLWZvcmdlZC1mb3JnZWQtZm9yZ2VkLWZvcmc="

local threads = {}
local paths = {}
local counter = 0
local prefix = ""
statuses = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(os.getenv("BENCH_FORGED")) do
    paths[#paths + 1] = line
  end
  math.randomseed(os.clock() * 1e6 + os.time())
  prefix = string.format("forged-%x-", math.random(0, 2^30))
end

local function hex24()
  return string.format("%08x%08x%08x", math.random(0, 2^31), math.random(0, 2^31),
    math.random(0, 2^31))
end

function request()
  counter = counter + 1
  local path
  local kind = counter % 10
  if kind == 0 then
    path = "/callbacks/jobs/" .. hex24()
  elseif kind == 1 then
    path = "/callbacks"
  else
    path = paths[(counter % #paths) + 1]
  end
  local body = string.format(
    '{"id":"%d","status":"COMPLETED","recordsCount":10,"recordsFailedCount":0,"sequence":%d}',
    counter, counter)
  wrk.headers["Elements-Webhook-Id"] = prefix .. counter
  return wrk.format(nil, path, nil, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    local counted = thread:get("statuses")
    for status, n in pairs(counted) do
      total[status] = (total[status] or 0) + n
    end
  end
  for status, n in pairs(total) do
    io.write(string.format("status %d %d\n", status, n))
  end
end
