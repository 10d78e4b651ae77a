-- figures.lua FILE -- prints the table of what the fault specs survived.
-- Each line of FILE is one spec's counts, appended by support/faults.lua
-- (F.figures): "name<TAB>run=...<TAB>items=N<TAB>killed=N...". Lines of
-- one spec and run are summed; the last row sums everything.
local path = assert(arg[1], "usage: luajit spec/fault/figures.lua FIGURES_FILE")
local cols = { "items", "killed", "faults", "survived", "bad_inputs", "lost", "overlaps" }
local heads = { "items processed", "hosts killed", "faults injected", "faults survived", "bad inputs tried",
                "rows lost", "overlaps seen" }
local rows, order, total = {}, {}, { name = "total" }
local flows = {} -- "name: N s" of the lines with flow_s, in order
for _, c in ipairs(cols) do total[c] = 0 end
local f = io.open(path)
if not f then
  print("no figures recorded (" .. path .. " is missing)")
  return
end
for line in f:lines() do
  local fields = {}
  for part in line:gmatch("[^\t]+") do fields[#fields + 1] = part end
  local name = fields[1]
  local run = line:match("\trun=([^\t]+)")
  if run and run ~= "" then name = name .. " (" .. run .. ")" end
  local row = rows[name]
  if not row then
    row = { name = name }
    for _, c in ipairs(cols) do row[c] = 0 end
    rows[name] = row
    order[#order + 1] = name
  end
  local flow = line:match("\tflow_s=([%d.]+)")
  if flow then flows[#flows + 1] = name .. ": " .. flow .. " s" end
  for _, c in ipairs(cols) do
    local v = tonumber(line:match("\t" .. c .. "=(%d+)")) or 0
    row[c] = row[c] + v
    total[c] = total[c] + v
  end
end
f:close()

local width = { #"spec" }
local list = {}
for _, n in ipairs(order) do list[#list + 1] = rows[n] end
list[#list + 1] = total
for _, r in ipairs(list) do width[1] = math.max(width[1], #r.name) end
local out = { "| " .. ("spec"):rep(1) .. (" "):rep(width[1] - 4) }
for i, h in ipairs(heads) do width[i + 1] = #h; out[1] = out[1] .. " | " .. h end
out[1] = out[1] .. " |"
local sep = "|" .. ("-"):rep(width[1] + 2)
for i = 2, #width do sep = sep .. "|" .. ("-"):rep(width[i] + 1) .. ":" end
out[2] = sep .. "|"
for _, r in ipairs(list) do
  local name = r == total and "**total**" or r.name
  local s = "| " .. name .. (" "):rep(math.max(0, width[1] - #name))
  for i, c in ipairs(cols) do
    local v = tostring(r[c])
    s = s .. " | " .. (" "):rep(width[i + 1] - #v) .. v
  end
  out[#out + 1] = s .. " |"
end
print("\nFault suite figures (" .. os.date("!%Y-%m-%d") .. "):\n")
print(table.concat(out, "\n"))
if #flows > 0 then
  print("\nSeconds from a fault until items flowed again:\n")
  for _, l in ipairs(flows) do print("- " .. l) end
end
if total.lost > 0 or total.overlaps > 0 then
  print("\nROWS LOST OR OVERLAPS SEEN: a guarantee is broken")
end
