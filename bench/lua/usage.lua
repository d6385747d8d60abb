-- recordUsage (BATCH = 1) or recordUsageBatch (BATCH > 1) with the service key, every record
-- with a new idempotency key (run nonce, thread, counter), users cycled.
--   wrk -s bench/lua/usage.lua URL -- SERVICE_KEY BATCH USER_PREFIX USERS NONCE
local thread_count = 0

function setup(thread)
  thread:set("tid", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. args[1] }
  batch = tonumber(args[2])
  prefix = args[3]
  users = tonumber(args[4])
  nonce = args[5] .. "-" .. tid .. "-"
  counter = 0
end

local function item()
  counter = counter + 1
  return '{"userId":"' .. prefix .. (counter % users) .. '","feature":"api_calls","quantity":1,'
    .. '"idempotencyKey":"' .. nonce .. counter .. '"}'
end

function request()
  local body
  if batch == 1 then
    body = '{"query":"mutation($input: RecordUsageInput!) { recordUsage(input: $input) { id duplicate } }",'
      .. '"variables":{"input":' .. item() .. '}}'
  else
    local items = {}
    for i = 1, batch do items[i] = item() end
    body = '{"query":"mutation($inputs: [RecordUsageInput!]!) { recordUsageBatch(inputs: $inputs) { id } }",'
      .. '"variables":{"inputs":[' .. table.concat(items, ",") .. ']}}'
  end
  return wrk.format("POST", nil, headers, body)
end
