-- The backoff rules of docs/api.md "Backoff", as a pure computation.
local bmdb = require "bmdb"

describe("bmdb.backoff_next", function()
  local next = bmdb.backoff_next

  it("keeps the previous period without a spec, 1 s when there is none", function()
    assert.equal(1, next(nil, nil))
    assert.equal(7, next(nil, 7))
    assert.equal(3, next(nil, 2.2)) -- whole seconds, rounded up
  end)

  it("gives initial for every failure when exponent is not above 1", function()
    assert.equal(30, next({ initial = 30 }, nil))
    assert.equal(30, next({ initial = 30 }, 30))
    assert.equal(30, next({ initial = 30, maximum = 100, exponent = 1 }, 30))
    assert.equal(30, next({ initial = 30, maximum = 100, exponent = 0.5 }, 60))
  end)

  it("multiplies, rounds up and caps on consecutive failures", function()
    local spec = { initial = 1, maximum = 20, exponent = 1.5 }
    local seq, last = {}, nil
    for _ = 1, 9 do
      last = next(spec, last)
      seq[#seq + 1] = last
    end
    assert.same({ 1, 2, 3, 5, 8, 12, 18, 20, 20 }, seq)
  end)

  it("grows by the decimal exponent exactly, whatever the doubles say", function()
    local spec = { initial = 60, exponent = 1.1, maximum = 120 }
    assert.equal(99, next(spec, 90)) -- 90 * 1.1 is 99.00000000000001 in doubles
    local seq, last = {}, nil
    for _ = 1, 9 do
      last = next(spec, last)
      seq[#seq + 1] = last
    end
    assert.same({ 60, 66, 73, 81, 90, 99, 109, 120, 120 }, seq)
    assert.equal(11, next({ initial = 10, exponent = 1.1, maximum = 100 }, 10)) -- 11.000000000000002
    assert.equal(23, next({ initial = 10, exponent = 2.3, maximum = 100 }, 10))
    assert.equal(115, next({ initial = 100, exponent = 1.15, maximum = 1000 }, 100))
    assert.equal(101, next({ initial = 1, exponent = 1.001, maximum = 10000 }, 100)) -- 100.1 rounds up
    assert.equal(1000, next({ initial = 1, exponent = 1.001, maximum = 10000 }, 999)) -- 999.999
  end)

  it("clamps a bad spec: initial below 1, maximum below initial", function()
    assert.equal(1, next({ initial = 0.2 }, nil))
    assert.equal(1, next({ initial = -5, exponent = 2, maximum = 0 }, 1))
    assert.equal(10, next({ initial = 10, maximum = 3, exponent = 2 }, 10))
  end)

  it("takes a number as a fixed period", function()
    assert.equal(15, next(15, 99))
  end)

  it("rejects a spec of the wrong type, naming it", function()
    local ok, err = pcall(next, "soon", nil)
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'backoff_next' (backoff: expected a table {initial=, maximum=, exponent=} " ..
      "or a number, got string)", tostring(err), 1, true)
  end)
end)
