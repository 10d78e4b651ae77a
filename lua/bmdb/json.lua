-- bmdb/json.lua -- bmdb.json: JSON that keeps every number and tells []
-- from {} (docs/talking-to-the-world.md, "JSON: bmdb.json").
--
--   encode(v) -> string, decode(s) -> value, null, array(t), is_array(t)
--
-- The codec is C (host/ljson.c: core.json_encode, core.json_decode); an
-- array is a table whose metatable is core.json_array, which decode sets
-- on every array it makes and array() sets on the caller's.
local core = require "bmdb.core"
local K = core.kinds
local U = require "bmdb.util"

local array_mt = core.json_array

local json = {
  encode = core.json_encode,
  decode = core.json_decode,
  null = core.json_null,
}

-- Marks t (a new table when nil) as an array, so encode writes it as one
-- even when it is empty, and returns it.
function json.array(t)
  if t == nil then t = {} end
  if type(t) ~= "table" then
    U.raise(K.usage, 2, "bad argument #1 to 'array' (table expected, got " .. type(t) .. ")")
  end
  local mt = getmetatable(t)
  if mt ~= nil and mt ~= array_mt then
    U.raise(K.usage, 2, "bad argument #1 to 'array' (the table has a metatable of its own)")
  end
  return setmetatable(t, array_mt)
end

function json.is_array(t)
  return type(t) == "table" and getmetatable(t) == array_mt
end

return json
