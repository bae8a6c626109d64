-- A stand-in for the `struct` library Redis gives its scripts, for fakeredis
-- (which loads Lua modules with `require` and ships none). Only `unpack` of
-- little- or big-endian integers and strings is here: what agentq's scripts
-- use. Any other format fails loudly rather than reading wrong.
local struct = {}

local function integer(data, at, size, little, signed)
  local value, scale = 0, 1
  for k = 0, size - 1 do
    local index = little and (at + k) or (at + size - 1 - k)
    value = value + string.byte(data, index) * scale
    scale = scale * 256
  end
  if signed and value >= scale / 2 then
    value = value - scale
  end
  return value
end

local SIZES = { b = 1, h = 2, i = 4, l = 8 }

function struct.unpack(format, data, init)
  local at = init or 1
  local little = true
  local out = {}
  local i = 1
  while i <= #format do
    local option = string.sub(format, i, i)
    local digits = string.match(format, '^%d+', i + 1) or ''
    i = i + 1 + #digits
    local size = tonumber(digits)
    if option == '<' then
      little = true
    elseif option == '>' then
      little = false
    elseif SIZES[string.lower(option)] then
      size = size or SIZES[string.lower(option)]
      if at + size - 1 > #data then error('struct.unpack: data string too short') end
      out[#out + 1] = integer(data, at, size, little, option ~= string.upper(option))
      at = at + size
    elseif option == 'c' then
      if size == 0 then
        -- 'c0': a string whose length is the integer just read (which it replaces).
        size = table.remove(out)
        if type(size) ~= 'number' then error("struct.unpack: 'c0' needs a previous size") end
      end
      size = size or 1
      if at + size - 1 > #data then error('struct.unpack: data string too short') end
      out[#out + 1] = string.sub(data, at, at + size - 1)
      at = at + size
    else
      error('struct.unpack: format option ' .. option .. ' is not supported here')
    end
  end
  out[#out + 1] = at
  return unpack(out)
end

return struct
