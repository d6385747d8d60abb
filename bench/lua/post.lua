-- POST one JSON body, each request with the next bearer token of a list (cycled per thread).
--   wrk -s bench/lua/post.lua URL -- BODY_FILE [TOKENS_FILE]
-- With BENCH_LIMIT=N in the environment, each thread stops after N responses (scenario 6).
local thread_count = 0

function setup(thread)
  thread:set("tid", thread_count)
  thread_count = thread_count + 1
end

local function read(path)
  local file = assert(io.open(path, "rb"))
  local text = file:read("*a")
  file:close()
  return text
end

function init(args)
  body = read(args[1])
  tokens = {}
  if args[2] and args[2] ~= "" then
    for line in io.lines(args[2]) do
      if line ~= "" then table.insert(tokens, line) end
    end
  end
  counter = tid or 0
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  counter = counter + 1
  if #tokens > 0 then
    headers["Authorization"] = "Bearer " .. tokens[counter % #tokens + 1]
  end
  return wrk.format("POST", nil, headers, body)
end

local limit = tonumber(os.getenv("BENCH_LIMIT") or "")
if limit then
  local seen = 0
  function response(status, headers, body)
    seen = seen + 1
    if seen >= limit then wrk.thread:stop() end
  end
end
