-- Signed callbacks, each with a unique Elements-Webhook-Id and a body never sent
-- before, spread over many jobs. BENCH_TARGETS names a file of lines
-- "<path>\t<signature>\t<body>" (the signature covers the body only, not the headers);
-- BENCH_THREADS threads each take every BENCH_THREADS-th line, in order, so no two
-- requests of a run carry the same body.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local made = 0
local targets = {}
local counter = 0
local prefix = ""

function setup(thread)
  thread:set("index", made)
  made = made + 1
end

function init(args)
  local threads = tonumber(os.getenv("BENCH_THREADS"))
  local n = 0
  for line in io.lines(os.getenv("BENCH_TARGETS")) do
    if n % threads == index then
      local path, signature, body = line:match("^([^\t]+)\t([^\t]+)\t(.*)$")
      targets[#targets + 1] = { path = path, signature = signature, body = body }
    end
    n = n + 1
  end
  math.randomseed(os.clock() * 1e6 + os.time())
  prefix = string.format("%x-%x-", math.random(0, 2^30), math.random(0, 2^30))
end

function request()
  counter = counter + 1
  local target = targets[((counter - 1) % #targets) + 1]
  wrk.headers["Elements-Webhook-Id"] = prefix .. counter
  wrk.headers["Elements-Webhook-Signature"] = target.signature
  return wrk.format(nil, target.path, nil, target.body)
end
