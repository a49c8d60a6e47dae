-- jobyard.lua: every Redis operation jobyard makes beyond Dramatiq's own, one command per call,
-- so each is atomic and costs one round trip. Called as EVALSHA with ARGV[1] = command.
--
-- Key layout (names built in jobyard/queue/keys.py; all keys are passed in KEYS):
--   jobyard:job:<id>        hash  name queue engine state attempts seq started_seq rmid
--                                 enqueued_at started_at finished_at result error error_class
--                                 traceback progress payload options
--       options: JSON of the dispatch's options a replay must keep (webhook_url, retry)
--       engine: "dramatiq" | "temporal" (a tombstone: the job belongs to Temporal)
--       state:  queued | running | retrying | succeeded | failed | dead | cancelled
--               (failed: a permanent error; dead: retries exhausted; both keep the payload)
--       cancel: "1" when cancellation of a running job was asked for
--       seq:    the run number the next Dramatiq message must carry; a message with any other
--               seq is stale (a duplicate left by a crash) and is dropped
--   jobyard:steps:<id>      hash  step name -> JSON result
--   jobyard:workers:<queue> zset  worker id -> last heartbeat, ms on Redis's clock
--   jobyard:joblog:changes  zset  job key -> when a worker last changed it (ms, with µs);
--       the job log's outbox: a worker's call that changes a job marks it here in the same
--       step, and the shipper (jobyard/worker/shipper.py) copies marked jobs to the database.
--       Only when the caller passes it: as the KEY after the command's own (see OWN_KEYS).
--   jobyard:joblog:shipper  str   the shipper holding the lease (one ships at a time)
--   jobyard:rate:<job>:<n>  str   job starts in rate window n
--   dramatiq:<queue>        list  message ids;  dramatiq:<queue>.msgs  hash id -> message
--   dramatiq:__heartbeats__ zset  Dramatiq broker id -> last heartbeat (ms)
--   dramatiq:__acks__.<broker id>.<queue>  set  message ids a consumer fetched, not yet acked
--
-- Times are Redis's own clock (TIME), so worker and web hosts never disagree about liveness.

local command = ARGV[1]

local function now_ms()
    local t = redis.call("time")
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- How many KEYS each job-changing worker command takes before the optional changes key.
local OWN_KEYS = {start = 3, progress = 1, finish = 4, complete = 4, reschedule = 5}
local changes_key = OWN_KEYS[command] and KEYS[OWN_KEYS[command] + 1]

-- Marks KEYS[1] (the job) for the job log shipper; a no-op when the job log is off.
local function changed()
    if changes_key then
        local t = redis.call("time")
        redis.call("zadd", changes_key, tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000, KEYS[1])
    end
end

local function live_workers(workers_key, timeout_ms)
    return redis.call("zcount", workers_key, now_ms() - tonumber(timeout_ms), "+inf")
end

local TERMINAL = {succeeded = true, failed = true, dead = true, cancelled = true}

-- Dramatiq's own ack (see dramatiq/brokers/redis/dispatch.lua), folded into our calls.
local function ack(acks_key, msgs_key, message_id)
    if message_id ~= "" and redis.call("srem", acks_key, message_id) > 0 then
        redis.call("hdel", msgs_key, message_id)
    end
end

-- Takes a job's waiting message off its queue and delay queue (KEYS[2..5]: queue list, queue
-- msgs, delay list, delay msgs). A copy a consumer already fetched is dropped by start_checks.
local function remove_waiting_message(message_id)
    if message_id then
        redis.call("lrem", KEYS[2], 0, message_id)
        redis.call("hdel", KEYS[3], message_id)
        redis.call("lrem", KEYS[4], 0, message_id)
        redis.call("hdel", KEYS[5], message_id)
    end
end

-- May a message carrying `seq` run this job now? "ok", the job's new attempt count and when it
-- first started (false if never), or why not. A resume after a durable sleep is the same
-- attempt; a retry, or a redelivery of a message that already started (its worker died), is a
-- new one.
local function start_checks(job_key, seq, is_resume)
    local job = redis.call("hmget", job_key, "engine", "state", "seq", "attempts", "started_seq",
                           "cancel", "started_at")
    if job[1] ~= "dramatiq" then
        return "lost"
    end
    if TERMINAL[job[2]] then
        return "done"
    end
    if job[3] ~= seq then
        return "stale"
    end
    if job[6] == "1" then
        redis.call("hset", job_key, "state", "cancelled", "finished_at", now_ms())
        changed()
        return "cancelled"
    end
    local attempts = tonumber(job[4] or "0")
    if is_resume == "0" or job[5] == seq then
        attempts = attempts + 1
    end
    return "ok", attempts, job[7]
end

-- enqueue: KEYS job, workers, queue list, queue msgs
--          ARGV job_id, redis message id, message, name, queue, heartbeat timeout ms, ttl s,
--               options JSON ("" for none)
-- -> {"enqueued"} | {"exists", engine, state} | {"no_workers"}
-- With no live worker the job is written as a Temporal tombstone, so that dispatching the same
-- id again never reaches Dramatiq while Temporal owns it.
if command == "enqueue" then
    local existing = redis.call("hmget", KEYS[1], "engine", "state")
    if existing[1] then
        return {"exists", existing[1], existing[2] or ""}
    end
    local now = now_ms()
    if live_workers(KEYS[2], ARGV[7]) == 0 then
        redis.call("hset", KEYS[1], "name", ARGV[5], "queue", ARGV[6], "engine", "temporal",
                   "state", "queued", "enqueued_at", now)
        redis.call("expire", KEYS[1], ARGV[8])
        return {"no_workers"}
    end
    -- No TTL while the job lives (sleeps and retries may outlast any); finish sets one.
    redis.call("hset", KEYS[1], "name", ARGV[5], "queue", ARGV[6], "engine", "dramatiq",
               "state", "queued", "attempts", 0, "seq", 0, "rmid", ARGV[3], "enqueued_at", now)
    if ARGV[9] ~= "" then
        redis.call("hset", KEYS[1], "options", ARGV[9])
    end
    redis.call("hset", KEYS[4], ARGV[3], ARGV[4])
    redis.call("rpush", KEYS[3], ARGV[3])
    return {"enqueued"}

-- start: KEYS job, steps, rate key prefix (the window number is appended)
--        ARGV seq, is_resume ("1"|"0"), rate calls (0 = none), rate period ms
-- -> {"ok", attempts, started_at ms, step, json, step, json, ...}
--    | {"lost"} | {"stale"} | {"done"} | {"cancelled"} | {"throttled", ms until the window frees}
elseif command == "start" then
    local status, attempts, started_at = start_checks(KEYS[1], ARGV[2], ARGV[3])
    if status ~= "ok" then
        return {status}
    end
    local calls = tonumber(ARGV[4])
    if calls > 0 and ARGV[3] == "0" then
        local period = tonumber(ARGV[5])
        local now = now_ms()
        local window = math.floor(now / period)
        local rate_key = KEYS[3] .. window
        local used = redis.call("incr", rate_key)
        if used == 1 then
            redis.call("pexpire", rate_key, period * 2)
        end
        if used > calls then
            return {"throttled", (window + 1) * period - now}
        end
    end
    started_at = started_at or now_ms()
    redis.call("hset", KEYS[1], "state", "running", "attempts", attempts, "started_seq", ARGV[2],
               "started_at", started_at)
    changed()
    local result = {"ok", attempts, started_at}
    local steps = redis.call("hgetall", KEYS[2])
    for i = 1, #steps do
        result[#result + 1] = steps[i]
    end
    return result

-- step: KEYS job, steps   ARGV seq, step name, JSON result, ttl s   -> "ok" | "lost" | "cancel"
-- ("cancel": recorded, and cancellation was asked for: stop at this step boundary)
elseif command == "step" then
    local job = redis.call("hmget", KEYS[1], "engine", "seq", "cancel")
    if job[1] ~= "dramatiq" or job[2] ~= ARGV[2] then
        return "lost"
    end
    redis.call("hset", KEYS[2], ARGV[3], ARGV[4])
    redis.call("expire", KEYS[2], ARGV[5])
    if job[3] == "1" then
        return "cancel"
    end
    return "ok"

-- progress: KEYS job   ARGV seq, JSON progress   -> "ok" | "lost"
elseif command == "progress" then
    if redis.call("hget", KEYS[1], "seq") ~= ARGV[2] then
        return "lost"
    end
    redis.call("hset", KEYS[1], "progress", ARGV[3])
    changed()
    return "ok"

-- finish: KEYS job, steps, dramatiq acks, dramatiq msgs
--         ARGV seq, state, result JSON, error, error class, ttl s, redis message id, payload JSON,
--              traceback
--         (the payload is kept for failed and dead jobs, so they can be replayed)
-- -> "ok" | "lost".  A terminal state; the records expire after ttl. Acks the Dramatiq message
-- in the same call (Dramatiq's own ack is then skipped), saving a round trip per job.
elseif command == "finish" then
    ack(KEYS[3], KEYS[4], ARGV[8])
    local job = redis.call("hmget", KEYS[1], "engine", "seq")
    if job[1] ~= "dramatiq" or job[2] ~= ARGV[2] then
        return "lost"
    end
    redis.call("hset", KEYS[1], "state", ARGV[3], "result", ARGV[4], "error", ARGV[5],
               "error_class", ARGV[6], "finished_at", now_ms())
    if ARGV[9] ~= "" then
        redis.call("hset", KEYS[1], "payload", ARGV[9])
    end
    if ARGV[10] ~= "" then
        redis.call("hset", KEYS[1], "traceback", ARGV[10])
    end
    redis.call("expire", KEYS[1], ARGV[7])
    redis.call("expire", KEYS[2], ARGV[7])
    changed()
    return "ok"

-- complete: KEYS job, steps, dramatiq acks, dramatiq msgs
--           ARGV seq, is_resume, result JSON, ttl s, redis message id
-- -> {"ok", attempts, started_at ms} | {"lost"} | {"stale"} | {"done"} | {"cancelled"}.
-- start + finish + ack for a run that never used a step:
-- such a handler had no side effects, so checking ownership after it ran is safe.
elseif command == "complete" then
    ack(KEYS[3], KEYS[4], ARGV[6])
    local status, attempts, started_at = start_checks(KEYS[1], ARGV[2], ARGV[3])
    if status ~= "ok" then
        return {status}
    end
    -- A run without steps has no step record (KEYS[2]) to expire; a first start is this one.
    local now = now_ms()
    started_at = started_at or now
    redis.call("hset", KEYS[1], "state", "succeeded", "result", ARGV[4], "attempts", attempts,
               "started_seq", ARGV[2], "started_at", started_at, "finished_at", now)
    redis.call("expire", KEYS[1], ARGV[5])
    changed()
    return {"ok", attempts, started_at}

-- reschedule: KEYS job, delay queue list, delay queue msgs, dramatiq acks, dramatiq msgs
--             ARGV seq, next seq, state, redis message id, message, error, error class,
--                  redis message id of the current message
-- -> "ok" | "lost".  Puts the job's next message (a retry, or a resume after a sleep) on the
-- delay queue, advances seq and acks the current message in one step, so a crash can never
-- leave two live messages, or none.
elseif command == "reschedule" then
    ack(KEYS[4], KEYS[5], ARGV[9])
    local job = redis.call("hmget", KEYS[1], "engine", "seq")
    if job[1] ~= "dramatiq" or job[2] ~= ARGV[2] then
        return "lost"
    end
    redis.call("hset", KEYS[1], "seq", ARGV[3], "state", ARGV[4], "rmid", ARGV[5],
               "error", ARGV[7], "error_class", ARGV[8])
    redis.call("hset", KEYS[3], ARGV[5], ARGV[6])
    redis.call("rpush", KEYS[2], ARGV[5])
    changed()
    return "ok"

-- handoff: KEYS job, queue list, queue msgs, delay list, delay msgs   ARGV name, queue, ttl s
-- -> {"claimed"} | {"lost", state}.  Gives the job to Temporal: removes a still-queued message
-- and marks the job Temporal's in one step. A job Dramatiq already started stays Dramatiq's.
elseif command == "handoff" then
    local job = redis.call("hmget", KEYS[1], "engine", "state", "rmid", "started_at")
    if job[1] == false then
        redis.call("hset", KEYS[1], "name", ARGV[2], "queue", ARGV[3], "engine", "temporal",
                   "state", "queued", "enqueued_at", now_ms())
        redis.call("expire", KEYS[1], ARGV[4])
        return {"claimed"}
    end
    if job[1] == "temporal" then
        return {"claimed"}
    end
    -- Only a job that never started: Temporal cannot see the steps a started one recorded.
    if job[2] ~= "queued" or job[4] then
        return {"lost", job[2]}
    end
    remove_waiting_message(job[3])
    redis.call("hset", KEYS[1], "engine", "temporal")
    return {"claimed"}

-- cancel: KEYS job, queue list, queue msgs, delay list, delay msgs   ARGV ttl s
-- -> {"cancelled"} | {"requested"} | {"done", state} | {"temporal"} | {"missing"}
-- A waiting job is cancelled at once (its message removed; a copy a worker already holds is
-- dropped by start_checks); a running one is flagged and stops at its next step boundary.
elseif command == "cancel" then
    local job = redis.call("hmget", KEYS[1], "engine", "state", "rmid")
    if job[1] == false then
        return {"missing"}
    end
    if job[1] ~= "dramatiq" then
        return {"temporal"}
    end
    if TERMINAL[job[2]] then
        return {"done", job[2]}
    end
    -- A "running" job whose message still waits on the delay queue is parked in a durable
    -- sleep: take the message away and cancel now. (A copy a consumer holds is dropped later.)
    local parked = job[3] and redis.call("hdel", KEYS[5], job[3]) > 0
    if job[2] == "running" and not parked then
        redis.call("hset", KEYS[1], "cancel", "1")
        return {"requested"}
    end
    remove_waiting_message(job[3])
    redis.call("hset", KEYS[1], "state", "cancelled", "finished_at", now_ms())
    redis.call("expire", KEYS[1], ARGV[2])
    return {"cancelled"}

-- replay: KEYS job, queue list, queue msgs   ARGV expected seq, redis message id, message
-- -> {"ok"} | {"active", state} | {"temporal"} | {"missing"} | {"conflict"}
-- Runs a failed, dead or cancelled job again with a new seq; its finished steps stay recorded.
elseif command == "replay" then
    local job = redis.call("hmget", KEYS[1], "engine", "state", "seq")
    if job[1] == false then
        return {"missing"}
    end
    if job[1] ~= "dramatiq" then
        return {"temporal"}
    end
    if not TERMINAL[job[2]] or job[2] == "succeeded" then
        return {"active", job[2]}
    end
    if tostring(tonumber(job[3] or "0") + 1) ~= ARGV[2] then
        return {"conflict"}
    end
    redis.call("hset", KEYS[1], "state", "queued", "seq", ARGV[2], "rmid", ARGV[3], "attempts", 0,
               "error", "", "error_class", "", "result", "", "enqueued_at", now_ms())
    redis.call("hdel", KEYS[1], "cancel", "finished_at", "started_seq", "traceback")
    redis.call("persist", KEYS[1])
    redis.call("hset", KEYS[3], ARGV[3], ARGV[4])
    redis.call("rpush", KEYS[2], ARGV[3])
    return {"ok"}

-- rescue: KEYS workers zset, queue list, queue msgs, handoff list
--         ARGV heartbeat timeout ms, how many at most, job key prefix
-- -> number of messages moved to the handoff list.
-- With no live worker for the queue, moves messages of jobs that never started from the queue
-- to the handoff list and marks the jobs Temporal's, in one step; the caller starts their
-- workflows from the handoff list and only then removes them from it, so a crash in between
-- loses nothing (a repeated start is refused by Temporal's workflow id). Jobs that already ran
-- a step stay for a worker: Temporal cannot see their recorded steps.
-- (The job keys are built here from the prefix: jobyard runs on a single Redis, not a cluster.)
elseif command == "rescue" then
    if live_workers(KEYS[1], ARGV[2]) > 0 then
        return 0
    end
    local moved = 0
    local ids = redis.call("lrange", KEYS[2], 0, tonumber(ARGV[3]) - 1)
    for _, message_id in ipairs(ids) do
        local data = redis.call("hget", KEYS[3], message_id)
        local job_id = data and cjson.decode(data)["args"][1]
        local job_key = job_id and (ARGV[4] .. job_id)
        local job = job_key and redis.call("hmget", job_key, "engine", "state", "started_at")
        if job and job[1] == "dramatiq" and job[2] == "queued" and not job[3] then
            redis.call("lrem", KEYS[2], 1, message_id)
            redis.call("hdel", KEYS[3], message_id)
            redis.call("hset", job_key, "engine", "temporal")
            redis.call("rpush", KEYS[4], data)
            moved = moved + 1
        end
    end
    return moved

-- heartbeat: KEYS dramatiq heartbeats, workers zset per queue...
--            ARGV worker id, dramatiq broker id   -> now (ms)
elseif command == "heartbeat" then
    local now = now_ms()
    redis.call("zadd", KEYS[1], now, ARGV[3])
    for i = 2, #KEYS do
        redis.call("zadd", KEYS[i], now, ARGV[2])
    end
    return now

-- deregister: KEYS workers zset per queue...   ARGV worker id
elseif command == "deregister" then
    for i = 1, #KEYS do
        redis.call("zrem", KEYS[i], ARGV[2])
    end
    return "ok"

-- live_workers: KEYS workers zset   ARGV heartbeat timeout ms  -> count
-- Also forgets workers dead for ten timeouts, so the set does not grow forever.
elseif command == "live_workers" then
    local timeout = tonumber(ARGV[2])
    redis.call("zremrangebyscore", KEYS[1], "-inf", now_ms() - 10 * timeout)
    return live_workers(KEYS[1], timeout)

-- lease: KEYS lease   ARGV holder, ms   -> 1 if the holder has (or now takes) the lease, else 0
elseif command == "lease" then
    local holder = redis.call("get", KEYS[1])
    if holder and holder ~= ARGV[2] then
        return 0
    end
    redis.call("set", KEYS[1], ARGV[2], "px", ARGV[3])
    return 1

-- shipped: KEYS changes   ARGV job key, score, job key, score, ...   -> how many were removed
-- Unmarks jobs the shipper wrote, unless a worker changed one again since it was read.
elseif command == "shipped" then
    local removed = 0
    for i = 2, #ARGV, 2 do
        if redis.call("zscore", KEYS[1], ARGV[i]) == ARGV[i + 1] then
            removed = removed + redis.call("zrem", KEYS[1], ARGV[i])
        end
    end
    return removed
end

return redis.error_reply("jobyard.lua: unknown command " .. tostring(command))
