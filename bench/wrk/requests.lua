-- wrk script for kvapi's HTTP API, the Litestar baseline and webdis.
-- Arguments after "--": mode, key count, auxiliary key count, app id,
-- service key, random seed. Keys are drawn at random from the ranges that
-- bench/workloads.py loads: k:1..KEYS, e:1..AUX and c:1..AUX for kvapi,
-- key:000000000000..key:(KEYS-1) for webdis.

local VALUE = string.rep("v", 98)
local MGET_KEYS = 100
local MGET_BODIES = 256

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_number", #threads)
end

local mode, keys, aux_keys, app, headers, json_headers
local mget_bodies = {}
local mget_next = 0

local function key_path(prefix, range)
  return "/v1/" .. app .. "/kv/" .. prefix .. math.random(range)
end

local function body_request(method, path, body)
  return wrk.format(method, path, json_headers, body)
end

function init(args)
  mode = args[1]
  keys = tonumber(args[2])
  aux_keys = tonumber(args[3])
  app = args[4]
  math.randomseed(tonumber(args[6]) + (thread_number or 0))
  headers = { ["Authorization"] = "Bearer " .. args[5] }
  json_headers = { ["Authorization"] = "Bearer " .. args[5], ["Content-Type"] = "application/json" }
  user_headers = { ["Authorization"] = "Bearer " .. (args[7] or "") }
  if mode == "mget" then
    -- Bodies are built once, so that wrk spends its time sending them.
    for b = 1, MGET_BODIES do
      local names = {}
      for i = 1, MGET_KEYS do
        names[i] = '"k:' .. math.random(keys) .. '"'
      end
      mget_bodies[b] = '{"op":"mget","keys":[' .. table.concat(names, ",") .. ']}'
    end
  end
end

function request()
  if mode == "get" then
    return wrk.format("GET", key_path("k:", keys), headers)
  elseif mode == "get_guarded" then
    return wrk.format("GET", key_path("k:", keys), user_headers)
  elseif mode == "get_touch" then
    return wrk.format("GET", key_path("k:", keys) .. "?touch=true", headers)
  elseif mode == "set_durable" then
    return body_request("PUT", key_path("k:", keys), '{"value":"' .. VALUE .. '"}')
  elseif mode == "set_ephemeral" then
    return body_request("PUT", key_path("e:", aux_keys), '{"value":"' .. VALUE .. '","ephemeral":true}')
  elseif mode == "incr" then
    return body_request("POST", key_path("c:", aux_keys), '{"op":"incr"}')
  elseif mode == "setnx" then
    return body_request("POST", key_path("k:", keys), '{"op":"setnx","value":"' .. VALUE .. '"}')
  elseif mode == "cas" then
    return body_request("POST", key_path("k:", keys),
      '{"op":"cas","expected":"' .. VALUE .. '","next":"' .. VALUE .. '"}')
  elseif mode == "mget" then
    mget_next = mget_next % MGET_BODIES + 1
    return body_request("POST", "/v1/" .. app .. "/kv", mget_bodies[mget_next])
  elseif mode == "const" then
    return wrk.format("GET", "/const", headers)
  elseif mode == "webdis_get" then
    return wrk.format("GET", string.format("/GET/key:%012d", math.random(keys) - 1))
  elseif mode == "webdis_set" then
    return wrk.format("GET", string.format("/SET/key:%012d/", math.random(keys) - 1) .. string.rep("v", 100))
  end
  error("unknown mode " .. tostring(mode))
end
