-- Signed callbacks, each with a unique Elements-Webhook-Id, spread over many jobs.
-- BENCH_TARGETS names a file of lines "<path>\t<signature>\t<body>" (the signature
-- covers the body only, not the headers); each thread walks them round-robin.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local targets = {}
local counter = 0
local prefix = ""

function init(args)
  for line in io.lines(os.getenv("BENCH_TARGETS")) do
    local path, signature, body = line:match("^([^\t]+)\t([^\t]+)\t(.*)$")
    targets[#targets + 1] = { path = path, signature = signature, body = body }
  end
  math.randomseed(os.clock() * 1e6 + os.time())
  prefix = string.format("%x-%x-", math.random(0, 2^30), math.random(0, 2^30))
  counter = math.random(0, #targets - 1)
end

function request()
  counter = counter + 1
  local target = targets[(counter % #targets) + 1]
  wrk.headers["Elements-Webhook-Id"] = prefix .. counter
  wrk.headers["Elements-Webhook-Signature"] = target.signature
  return wrk.format(nil, target.path, nil, target.body)
end
