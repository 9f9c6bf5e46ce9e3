-- Hands leases back without a failed attempt: each message is ready again at once.
-- ARGV: prefix, then 3 values per lease: queue, entry id, token.
-- Returns how many leases were still held (stale ones are ignored).
local released = 0
local woken = {}
local touched = {}
for i = 2, #ARGV, 3 do
  local q, id = ARGV[i], ARGV[i + 1]
  local name = lease_name(q, id, ARGV[i + 2])
  if name then
    unfresh(q, name)
    park(q, id, 0)
    released = released + 1
    touched[#touched + 1] = {q, name}
    if not woken[q] then
      wake(q)
      woken[q] = true
    end
  end
end
for _, t in ipairs(touched) do
  forget_lease_if_empty(t[1], t[2])
end
return released
