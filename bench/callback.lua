-- Signed callbacks, each with a unique Elements-Webhook-Id. The body and its signature
-- come from the environment (the signature covers the body only, not the headers).
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Elements-Webhook-Signature"] = os.getenv("BENCH_SIGNATURE")

local counter = 0
local prefix = ""

function init(args)
  math.randomseed(os.clock() * 1e6 + os.time())
  prefix = string.format("%x-%x-", math.random(0, 2^30), math.random(0, 2^30))
end

function request()
  counter = counter + 1
  wrk.headers["Elements-Webhook-Id"] = prefix .. counter
  return wrk.format()
end
