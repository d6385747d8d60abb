-- POST pre-signed Stripe events, a distinct one per request (wrk's LuaJIT has no HMAC).
--   wrk -s bench/lua/webhook.lua URL -- TEMPLATES_FILE EVENTS_FILE THREADS
-- TEMPLATES_FILE: one event body per line with @@EVT@@ where the event id goes.
-- EVENTS_FILE: "template index<TAB>event id<TAB>Stripe-Signature" per line; thread k of n sends
-- lines k, k+n, k+2n, ... so no two threads send the same event. Past the end it wraps around
-- (duplicates): the harness writes more lines than a run can send.
local thread_count = 0

function setup(thread)
  thread:set("tid", thread_count)
  thread_count = thread_count + 1
end

function init(args)
  templates = {}
  for line in io.lines(args[1]) do
    local at = assert(line:find("@@EVT@@", 1, true))
    table.insert(templates, { line:sub(1, at - 1), line:sub(at + 7) })
  end
  local threads = tonumber(args[3])
  events = {}
  local index = 0
  for line in io.lines(args[2]) do
    if index % threads == tid then
      local template, id, signature = line:match("^(%d+)\t([^\t]+)\t(.+)$")
      table.insert(events, { templates[tonumber(template) + 1], id, signature })
    end
    index = index + 1
  end
  counter = 0
  headers = { ["Content-Type"] = "application/json" }
end

function request()
  local event = events[counter % #events + 1]
  counter = counter + 1
  headers["Stripe-Signature"] = event[3]
  return wrk.format("POST", nil, headers, event[1][1] .. event[2] .. event[1][2])
end
