-- pdp_auth.lua: ask pdp about every request, from HAProxy (>= 2.6: core.httpclient with a Unix socket
-- as dst; built with Lua: `haproxy -vv` shows "Built with Lua version").
--
--   global
--       lua-load /etc/haproxy/pdp_auth.lua
--   frontend ...
--       http-request lua.pdp_auth unix@/run/haproxy/pdp-authz.sock
--
-- The argument is where pdp's HTTP ext_authz endpoint is reached, in HAProxy's address syntax; see
-- haproxy.cfg for why it is a local listener that carries the gateway's certificate on to pdp.
--
-- pdp is asked with GET /ext_authz and the original request in X-Forwarded-Method, -Uri (the request
-- target as the upstream gets it, never decoded), -Host (every Host line, whole, with its port) and
-- -Proto, the client's certificate as RFC 9440 Client-Cert, and every other client header, each line
-- whole (pdp.toml: cert_header = "rfc9440", forwarded_request = "traefik"). pdp judges what the
-- upstream gets: a value cut down here (a fetch such as req.hdr() returns only the last of a
-- comma-separated list) would let the upstream read something pdp never saw. Then pdp's answer is
-- copied:
--   allow (2xx): the headers pdp names in x-envoy-auth-headers-to-remove are deleted (Authorization,
--     DPoP, and each x-pdp-* header it does not set) and its x-pdp-* identity headers are set;
--   deny: the client gets pdp's status, WWW-Authenticate, DPoP-Nonce, reason headers and body;
--   no answer from pdp: 503, never the upstream.

local TIMEOUT_MS = 2000

-- Never forwarded to pdp from the client: hop-by-hop headers, the body's framing (no body is sent),
-- the Host (pdp reads X-Forwarded-Host) and what only this script may say.
local NOT_FORWARDED = {
    ["host"] = true, ["connection"] = true, ["keep-alive"] = true, ["proxy-connection"] = true,
    ["te"] = true, ["trailer"] = true, ["transfer-encoding"] = true, ["upgrade"] = true,
    ["content-length"] = true, ["expect"] = true,
    ["client-cert"] = true, ["client-cert-chain"] = true,
    ["x-forwarded-method"] = true, ["x-forwarded-uri"] = true, ["x-forwarded-host"] = true,
    ["x-forwarded-proto"] = true,
}

-- pdp's answer headers that describe the answer rather than go upstream.
local ANSWER_ONLY = { ["x-pdp-reason"] = true, ["x-pdp-status"] = true }

-- On a deny, what the client gets from pdp's answer besides the status and body.
local DENY_HEADERS = {
    "www-authenticate", "dpop-nonce", "content-type", "x-pdp-decision-id", "x-pdp-reason", "x-pdp-status",
}

-- HAProxy's header tables count from 0 (requests) or from 1 (httpclient answers): read both.
local function values(list)
    local out = {}
    if list == nil then
        return out
    end
    local i = 0
    if list[0] == nil then
        i = 1
    end
    while list[i] ~= nil do
        out[#out + 1] = list[i]
        i = i + 1
    end
    return out
end

-- The request target as the upstream gets it. HAProxy shows an HTTP/2 request in absolute form
-- (scheme, :authority, :path) and sends the upstream its path and query; an HTTP/1 target goes on as
-- received: "/path?query", or "*" and an absolute-form URI, which pdp refuses (not a path) rather than
-- judge a path the upstream never gets.
local function target(txn)
    local url = txn.f:url() or ""
    local version = txn.f:req_ver()
    if string.sub(url, 1, 1) ~= "/" and (version == "2.0" or version == "3.0") then
        return txn.f:pathq() or url
    end
    return url
end

-- Boolean sample fetches reach Lua as 0 or 1 (a number, and 0 is true in Lua) or as a boolean.
local function is_true(value)
    return value == true or value == 1
end

local function unavailable(txn, why)
    core.Warning("pdp_auth: pdp did not answer (" .. why .. "): 503")
    txn:done({
        status = 503,
        headers = { ["content-type"] = { "application/json" } },
        body = '{"reason": "pdp_unavailable"}\n',
    })
end

local function pdp_auth(txn, dst)
    -- One value per header line, whole: never req_hdr(), which splits a line at its commas. (HAProxy
    -- gives names in lower case; lines whose names differ only in case would be kept all the same.)
    local lines = {}
    for name, list in pairs(txn.http:req_get_headers()) do
        name = string.lower(name)
        lines[name] = lines[name] or {}
        for _, value in ipairs(values(list)) do
            table.insert(lines[name], value)
        end
    end
    local headers = {}
    for name, list in pairs(lines) do
        if not NOT_FORWARDED[name] then
            headers[name] = list
        end
    end
    headers["x-forwarded-method"] = { txn.f:method() }
    headers["x-forwarded-uri"] = { target(txn) }
    -- Empty without a Host (HTTP/1.0); two values (HAProxy refuses two Host lines itself) are joined,
    -- and pdp refuses them.
    headers["x-forwarded-host"] = { table.concat(lines["host"] or {}, ",") }
    headers["x-forwarded-proto"] = { is_true(txn.f:ssl_fc()) and "https" or "http" }
    local der = txn.f:ssl_c_der()
    if der ~= nil and #der > 0 then
        headers["client-cert"] = { ":" .. txn.c:base64(der) .. ":" }
    end

    local ok, answer = pcall(function()
        return core.httpclient():get({
            url = "http://pdp/ext_authz", dst = dst, headers = headers, timeout = TIMEOUT_MS,
        })
    end)
    if not ok then
        return unavailable(txn, tostring(answer))
    end
    local status = answer and tonumber(answer.status) or 0
    local got = {}
    for name, list in pairs(answer and answer.headers or {}) do
        got[string.lower(name)] = values(list)
    end
    -- Every answer of pdp's names its decision; anything else (a proxy's error page) is not one.
    if status == 0 or got["x-pdp-decision-id"] == nil then
        return unavailable(txn, "status " .. tostring(status))
    end

    if status >= 200 and status < 300 then
        for _, list in ipairs(got["x-envoy-auth-headers-to-remove"] or {}) do
            for name in string.gmatch(list, "[^,%s]+") do
                txn.http:req_del_header(name)
            end
        end
        for name, list in pairs(got) do
            if string.sub(name, 1, 6) == "x-pdp-" and not ANSWER_ONLY[name] then
                txn.http:req_set_header(name, list[#list])
            end
        end
        return
    end

    local reply = { status = status, headers = {}, body = answer.body or "" }
    for _, name in ipairs(DENY_HEADERS) do
        if got[name] ~= nil then
            reply.headers[name] = got[name]
        end
    end
    txn:done(reply)
end

core.register_action("pdp_auth", { "http-req" }, pdp_auth, 1)
