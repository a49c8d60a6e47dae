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
--       lone:   the seq of the last run that started as a suspect, alone in its process (see
--               reclaim); a suspect start that finds it equal to seq follows a run of that
--               message that died alone, a death that is the job's own
--       lone_attempts: the attempts that suspect start was allowed (its retry policy's)
--       died:   how the last process that died holding the job's message ended (see reclaim)
--       deaths: how many processes died holding the job's message (see reclaim)
--   jobyard:steps:<id>      hash  step name -> JSON result
--   jobyard:workers:<queue> zset  worker id -> last heartbeat, ms on Redis's clock
--   jobyard:joblog:events   stream  the job log's outbox: one entry per change a worker's call
--       makes to a job (a state, a progress report), appended in the same step; the shipper
--       (jobyard/worker/shipper.py) writes them to the database in order, then trims them.
--       Fields: job (its key), at (Redis time, "s.µs"), and those the change set: state name
--       queue attempts enqueued_at started_at run_at (ms) progress result error error_class
--       traceback payload. Only when the caller passes it: as the KEY after the command's own
--       (its events_key).
--   jobyard:joblog:shipper  str   the shipper holding the lease (one ships at a time)
--   jobyard:parked:<queue>  zset  message ids of <queue> held by a flow-control limit (their
--       data in dramatiq:<queue>.msgs) -> when they ask again (ms): a job refused a slot at
--       dispatch, or refused a permit at its start (docs/flow-control.md). `fetch` moves the due
--       ones to their lists first; `wake` moves one at once (a slot was released for it). Such a
--       job's record shows why it waits: "hold_state" (its display_state) and "hold_reason",
--       cleared when it starts.
--   jobyard:suspects:<queue> list  ids of messages taken back from a dead process, waiting
--       (their data still in the queue's msgs hash) to be marked suspect and requeued
--   dramatiq:<queue>        list  message ids;  dramatiq:<queue>.msgs  hash id -> message
--   jobyard:band:<queue>:<p> list  ids of messages of priority p (-100..100, not 0) waiting on
--       <queue>, their data in dramatiq:<queue>.msgs; priority 0 waits on dramatiq:<queue>, so
--       jobs without a priority take Dramatiq's path unchanged. A job's priority is its record's
--       "priority" field (absent: 0), which every path that puts a message back reads.
--   jobyard:bands:<queue>   zset  p -> -p for each band that may hold messages (fetch drops
--       the ones it empties): `fetch` takes bands p > 0, highest first, then the queue's list,
--       then bands p < 0; lists keep dispatch order within a band.
--   jobyard:priority:<queue> channel: a message of priority > 0 entered the queue (workers
--       fetch it before the messages they prefetched, see jobyard.queue.worker)
--   jobyard:lost_writes_before str  ms: this server may lack writes made before then (set by
--       a client that found a new server behind its address: a failover, see queue/client.py)
--   dramatiq:__heartbeats__ zset  Dramatiq broker id -> last heartbeat (ms)
--   dramatiq:__acks__.<broker id>.<queue>  set  message ids a consumer fetched, not yet acked
--
-- Times are Redis's own clock (TIME), so worker and web hosts never disagree about liveness.

local command = ARGV[1]

-- Redis's clock, read once per call: every time one call writes is the same instant (and a
-- call that writes a job's record and its outbox entry makes one TIME call, not two).
local clock
local function redis_time()
    if not clock then
        clock = redis.call("time")
    end
    return clock
end

local function now_ms()
    local t = redis_time()
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The items of a list from index `first` on: a command's variable-length KEYS or ARGV.
local function from(list, first)
    local items = {}
    for i = first, #list do
        items[#items + 1] = list[i]
    end
    return items
end

-- Appends a change of the job to the job log's outbox: `...` is field, value, field, value
-- (a false, nil or empty value is left out). A no-op when the job log is off (no events key:
-- each job-changing worker command takes it, optionally, as the KEY after its own).
local function changed(events_key, job_key, ...)
    if not events_key then
        return
    end
    local t = redis_time()
    local entry = {"job", job_key, "at", t[1] .. "." .. string.format("%06d", t[2])}
    local fields = {...}
    for i = 1, select("#", ...), 2 do
        local value = fields[i + 1]
        if value and value ~= "" then
            entry[#entry + 1] = fields[i]
            entry[#entry + 1] = value
        end
    end
    redis.call("xadd", events_key, "*", unpack(entry))
end

-- `now`: the caller's now_ms(), when it has one (one TIME call fewer).
local function live_workers(workers_key, timeout_ms, now)
    return redis.call("zcount", workers_key, (now or now_ms()) - tonumber(timeout_ms), "+inf")
end

local TERMINAL = {succeeded = true, failed = true, dead = true, cancelled = true}

-- Dramatiq's own ack (see dramatiq/brokers/redis/dispatch.lua), folded into our calls.
local function ack(acks_key, msgs_key, message_id)
    if message_id ~= "" and redis.call("srem", acks_key, message_id) > 0 then
        redis.call("hdel", msgs_key, message_id)
    end
end

-- Takes a job's waiting message off its queue and delay queue. A copy a consumer already
-- fetched is dropped by start_checks.
local function remove_waiting_message(queue_key, queue_msgs_key, delay_key, delay_msgs_key,
                                      message_id)
    if message_id then
        redis.call("lrem", queue_key, 0, message_id)
        redis.call("hdel", queue_msgs_key, message_id)
        redis.call("lrem", delay_key, 0, message_id)
        redis.call("hdel", delay_msgs_key, message_id)
    end
end

-- Where a message of priority `p` waits: the queue's list for 0, else its band, listed in the
-- queue's band index (score -p: the highest priority first).
local function waiting_list(queue_key, bands_key, band_prefix, p)
    if p == 0 then
        return queue_key
    end
    redis.call("zadd", bands_key, -p, p)
    return band_prefix .. p
end

-- The priority of the job a message carries: its record's "priority", 0 when it has none (or
-- the message cannot be read: Dramatiq's path, as before priorities).
local function priority_of(job_prefix, data)
    local ok, message = pcall(cjson.decode, data)
    local job_id = ok and type(message) == "table" and type(message["args"]) == "table"
                   and message["args"][1]
    if type(job_id) ~= "string" then
        return 0
    end
    return tonumber(redis.call("hget", job_prefix .. job_id, "priority")) or 0
end

-- Puts back fetched messages, each where it waited: priority 0 at the back of the queue's list
-- (as Dramatiq does) unless `zero_first`, a band's at the front of its band, in their order
-- (they were fetched before the messages still there). `entries`: {message id, priority} in
-- fetch order. With `channel`, a message put back above priority 0 is published there, as an
-- enqueue would (workers fetch it before what they prefetched).
local function put_back(queue_key, bands_key, band_prefix, entries, zero_first, channel)
    local fronts, top = {}, 0
    for _, entry in ipairs(entries) do
        if entry[2] == 0 and not zero_first then
            redis.call("rpush", queue_key, entry[1])
        else
            fronts[#fronts + 1] = entry
        end
    end
    for i = #fronts, 1, -1 do
        local p = fronts[i][2]
        local list_key = p == 0 and queue_key or waiting_list(queue_key, bands_key, band_prefix, p)
        redis.call("lpush", list_key, fronts[i][1])
        top = math.max(top, p)
    end
    if channel and top > 0 then
        redis.call("publish", channel, top)
    end
end

-- A finished job's record expires after the retention enqueue stored in it ("ttl").
local function expire_finished(job_key)
    local ttl = redis.call("hget", job_key, "ttl")
    if ttl then
        redis.call("expire", job_key, ttl)
    end
end

-- A parked message (see jobyard:parked) enters its job's list, at the back; published as an
-- enqueue would be when its priority is above 0, or whatever it is with `announce` (a wake:
-- workers idling in their fetch backoff fetch it now).
local function unpark(parked_key, queue_key, queue_msgs_key, bands_key, band_prefix, job_prefix,
                      channel, message_id, announce)
    redis.call("zrem", parked_key, message_id)
    local data = redis.call("hget", queue_msgs_key, message_id)
    if not data then
        return  -- cancelled or handed off while it waited
    end
    local p = priority_of(job_prefix, data)
    redis.call("rpush", waiting_list(queue_key, bands_key, band_prefix, p), message_id)
    if channel and (p > 0 or announce) then
        redis.call("publish", channel, p)
    end
end

-- May a message carrying `seq` run this job now? "ok", the job's new attempt count, when it
-- first started (false if never) and the job's name, queue and enqueued_at (for the job log's
-- event), or why not. A resume after a durable sleep is the same attempt; a retry, or a
-- redelivery of a message that already started (its worker died), is a new one.
local function start_checks(job_key, events_key, seq, is_resume)
    local job = redis.call("hmget", job_key, "engine", "state", "seq", "attempts", "started_seq",
                           "cancel", "started_at", "name", "queue", "enqueued_at", "lone", "died",
                           "hold_state")
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
        expire_finished(job_key)
        changed(events_key, job_key, "state", "cancelled", "name", job[8], "queue", job[9],
                "attempts", job[4], "started_at", job[7])
        return "cancelled"
    end
    if job[13] then  -- no longer held by a flow-control limit: it starts
        redis.call("hdel", job_key, "hold_state", "hold_reason")
    end
    local attempts = tonumber(job[4] or "0")
    if is_resume == "0" or job[5] == seq then
        attempts = attempts + 1
    end
    return "ok", attempts, job[7], {name = job[8], queue = job[9], enqueued_at = job[10],
                                    prior_attempts = tonumber(job[4] or "0"),
                                    died_alone = job[11] == seq, died = job[12]}
end

-- Whether step records of an earlier run of this job may be missing here, though the run
-- returned those steps (1) or not (0), so the caller reads the step journal (the database)
-- too; the answer costs the normal path no database read. They may be missing when this run
-- follows another (attempts > 1: a redelivery after a worker died between the journal's
-- commit and this record, or after a run that gave up writing a record while Redis was
-- down) or when this Redis started after the job's dispatch (it restarted, and lost what its
-- AOF had not written; its start and the run's own were lost with it too, so attempts says
-- nothing). LASTSAVE is the server's start time until an RDB save (the only later change of
-- it): a save after the dispatch only costs a read. It counts whole seconds, hence the + 1.
-- A replica promoted by a failover did not restart, but may lack the old primary's last
-- writes: the client that saw the switch wrote when (`lost_key`), and a job dispatched before
-- then reads the journal too.
local function may_have_lost(attempts, enqueued_at, lost_key)
    local enqueued = tonumber(enqueued_at or "0")
    if attempts > 1 or enqueued < (redis.call("lastsave") + 1) * 1000
            or enqueued < tonumber(redis.call("get", lost_key) or "0") then
        return 1
    end
    return 0
end

-- Whether the queue has a live worker, asked of Redis at most once per call and only when a
-- job needs the answer (a job that exists already does not).
local function liveness(workers_key, timeout_ms, now)
    local live
    return function()
        if live == nil then
            live = live_workers(workers_key, timeout_ms, now) > 0
        end
        return live
    end
end

-- A new Dramatiq job's record, queued. No TTL while the job lives (sleeps and retries may
-- outlast any); finish sets one.
local function write_queued(job_key, name, queue, now, message_id, ttl, options, seq)
    if options ~= "" then
        redis.call("hset", job_key, "name", name, "queue", queue, "engine", "dramatiq",
                   "state", "queued", "attempts", 0, "seq", seq, "rmid", message_id,
                   "enqueued_at", now, "ttl", ttl, "options", options)
    else
        redis.call("hset", job_key, "name", name, "queue", queue, "engine", "dramatiq",
                   "state", "queued", "attempts", 0, "seq", seq, "rmid", message_id,
                   "enqueued_at", now, "ttl", ttl)
    end
end

-- One job's enqueue, for `enqueue` and `enqueue_many`; `is_live`: see `liveness`. With no live
-- worker the job is written as a Temporal tombstone, so that dispatching the same id again
-- never reaches Dramatiq while Temporal owns it.
-- `band`: nil for priority 0, else {priority, bands key, band prefix ("" when the message goes to
-- the delay queue: it enters its band when due, see hand_back), channel}.
-- `park`: nil, or {parked key, until ms, hold_state, hold_reason}: a flow-control limit holds
-- the job; its message waits in the parked set until then or a `wake` (see jobyard:parked).
local function enqueue_job(job_key, queue_key, queue_msgs_key, is_live, now, message_id, message,
                           name, queue, ttl, options, seq, band, park)
    local existing = redis.call("hmget", job_key, "engine", "state")
    if existing[1] then
        return {"exists", existing[1], existing[2] or ""}
    end
    if not is_live() then
        redis.call("hset", job_key, "name", name, "queue", queue, "engine", "temporal",
                   "state", "queued", "enqueued_at", now)
        redis.call("expire", job_key, ttl)
        return {"no_workers"}
    end
    write_queued(job_key, name, queue, now, message_id, ttl, options, seq)
    redis.call("hset", queue_msgs_key, message_id, message)
    if park then
        if band then
            redis.call("hset", job_key, "priority", band[1])
        end
        redis.call("zadd", park[1], park[2], message_id)
        redis.call("hset", job_key, "hold_state", park[3], "hold_reason", park[4],
                   "run_at", park[2])
        return {"enqueued"}
    end
    if band then
        local p = band[1]
        redis.call("hset", job_key, "priority", p)
        if band[3] ~= "" then
            queue_key = waiting_list(queue_key, band[2], band[3], p)
            if p > 0 then
                redis.call("publish", band[4], p)
            end
        end
    end
    redis.call("rpush", queue_key, message_id)
    return {"enqueued"}
end

-- Calls `command` with `items` appended (after `key`, unless it is nil), at most 2000 of them per
-- call (Lua's C stack bounds what one unpack may spread); returns the sum of the replies.
local function call_spread(command, key, items, first)
    local total = 0
    for at = first or 1, #items, 2000 do
        local last = math.min(at + 1999, #items)
        if key then
            total = total + redis.call(command, key, unpack(items, at, last))
        else
            total = total + redis.call(command, unpack(items, at, last))
        end
    end
    return total
end

-- enqueue: KEYS job, workers, queue list, queue msgs [, bands]
--          ARGV job_id, redis message id, message, name, queue, heartbeat timeout ms, ttl s,
--               options JSON ("" for none), seq (the run number the message carries; 0 but for
--               a job recovered from the job log)
--               [, priority (not 0), band prefix ("" for a delayed message), priority channel]
--               [, parked until (ms), hold_state, hold_reason: with KEYS[6] the parked set;
--                  then the priority arguments are given, priority 0 too]
-- -> {"enqueued"} | {"exists", engine, state} | {"no_workers"}
if command == "enqueue" then
    local job_key, workers_key, queue_key, queue_msgs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
    -- The job id is in the job key already: the script reads it from there.
    local _job_id, message_id, message, name, queue = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
    local timeout_ms, ttl, options, seq = ARGV[7], ARGV[8], ARGV[9], ARGV[10] or "0"

    local band, park = nil, nil
    if ARGV[11] and ARGV[11] ~= "0" then
        band = {tonumber(ARGV[11]), KEYS[5], ARGV[12], ARGV[13]}
    end
    if ARGV[14] then
        park = {KEYS[6], ARGV[14], ARGV[15], ARGV[16]}
    end

    local now = now_ms()
    return enqueue_job(job_key, queue_key, queue_msgs_key, liveness(workers_key, timeout_ms, now),
                       now, message_id, message, name, queue, ttl, options, seq, band, park)

-- enqueue_many: KEYS workers, queue list, queue msgs, job 1, job 2, ... (one queue's batch)
--               ARGV queue, heartbeat timeout ms, ttl s, then four per job in KEYS' order:
--                    name, redis message id, message, options JSON ("" for none)
-- -> the number of jobs, when every job was new and is enqueued (the common case: one word for
--    the batch), else one word per job, in order: "enqueued" | "no_workers" |
--    "exists:<engine>:<state>" (flat, not `enqueue`'s arrays: read per job on the dispatch path)
elseif command == "enqueue_many" then
    local workers_key, queue_key, queue_msgs_key = KEYS[1], KEYS[2], KEYS[3]
    local queue, timeout_ms, ttl = ARGV[2], ARGV[3], ARGV[4]
    local first_job, per_job = 4, 4

    local now = now_ms()
    local is_live = liveness(workers_key, timeout_ms, now)
    -- A live queue and a batch of jobs none of which exists (one EXISTS for the batch, where
    -- enqueue_job reads each job's record): each job's record is written as enqueue_job writes
    -- it, then the batch's messages in two calls. The script is atomic, so the order of the
    -- writes within it is not seen; a job listed twice is "exists" the second time, as there.
    if #KEYS >= first_job and is_live() and call_spread("exists", nil, KEYS, first_job) == 0 then
        local message_ids, messages, listed, replies = {}, {}, {}, nil
        for i = first_job, #KEYS do
            local at = 5 + (i - first_job) * per_job
            local name, message_id, message, options = ARGV[at], ARGV[at + 1], ARGV[at + 2],
                                                       ARGV[at + 3]
            if listed[KEYS[i]] then
                replies = replies or {}
                replies[i - first_job + 1] = "exists:dramatiq:queued"
            else
                listed[KEYS[i]] = true
                write_queued(KEYS[i], name, queue, now, message_id, ttl, options, "0")
                message_ids[#message_ids + 1] = message_id
                messages[#messages + 1] = message_id
                messages[#messages + 1] = message
            end
        end
        call_spread("hset", queue_msgs_key, messages)
        call_spread("rpush", queue_key, message_ids)
        if replies == nil then
            return #KEYS - first_job + 1
        end
        for j = 1, #KEYS - first_job + 1 do
            replies[j] = replies[j] or "enqueued"
        end
        return replies
    end
    local replies = {}
    for i = first_job, #KEYS do
        local at = 5 + (i - first_job) * per_job
        local name, message_id, message, options = ARGV[at], ARGV[at + 1], ARGV[at + 2],
                                                   ARGV[at + 3]
        local reply = enqueue_job(KEYS[i], queue_key, queue_msgs_key, is_live, now, message_id,
                                  message, name, queue, ttl, options, "0")
        replies[#replies + 1] = table.concat(reply, ":")
    end
    return replies

-- start: KEYS job, steps, lost writes mark [, events]
--        ARGV seq, is_resume ("1"|"0")
--             [, the job's attempts when the message is a suspect (see reclaim), else 0]
-- -> {"ok", attempts, started_at ms, may_have_lost (1|0), step, json, step, json, ...}
--    | {"lost"} | {"stale"} | {"done"} | {"cancelled"}
--    | {"exhausted", attempts, how the last process died}: a suspect whose last run died alone
--      and used the last attempt; nothing is written (the caller finishes it dead)
-- A suspect runs alone in its process: its start is recorded ("lone") before its handler runs,
-- so that a death during it is known to be its own. (Rate limits are the permit store's, asked
-- before this call: see jobyard.job_engine.flow.)
elseif command == "start" then
    local job_key, steps_key, lost_key, events_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
    local seq, is_resume = ARGV[2], ARGV[3]
    local suspect_attempts = tonumber(ARGV[4] or "0")

    local status, attempts, started_at, job = start_checks(job_key, events_key, seq, is_resume)
    if status ~= "ok" then
        return {status}
    end
    if suspect_attempts > 0 and job.died_alone and job.prior_attempts >= suspect_attempts then
        return {"exhausted", job.prior_attempts, job.died or ""}
    end
    started_at = started_at or now_ms()
    redis.call("hset", job_key, "state", "running", "attempts", attempts, "started_seq", seq,
               "started_at", started_at)
    if suspect_attempts > 0 then
        redis.call("hset", job_key, "lone", seq, "lone_attempts", suspect_attempts)
    end
    changed(events_key, job_key, "state", "running", "name", job.name, "queue", job.queue,
            "attempts", attempts, "enqueued_at", job.enqueued_at, "started_at", started_at)
    local result = {"ok", attempts, started_at, may_have_lost(attempts, job.enqueued_at, lost_key)}
    local steps = redis.call("hgetall", steps_key)
    for i = 1, #steps do
        result[#result + 1] = steps[i]
    end
    return result

-- step: KEYS job, steps   ARGV seq, step name, JSON result, ttl s [, JSON timing]
-- -> "ok" | "lost" | "cancel".  The timing (when the step ran, its attempt) goes in the steps
-- hash as "__timing__:<step>" (names starting with "__" are the engines' own).
-- ("cancel": recorded, and cancellation was asked for: stop at this step boundary)
elseif command == "step" then
    local job_key, steps_key = KEYS[1], KEYS[2]
    local seq, step, result, ttl = ARGV[2], ARGV[3], ARGV[4], ARGV[5]

    local job = redis.call("hmget", job_key, "engine", "seq", "cancel")
    if job[1] ~= "dramatiq" or job[2] ~= seq then
        return "lost"
    end
    if ARGV[6] and ARGV[6] ~= "" then
        redis.call("hset", steps_key, step, result, "__timing__:" .. step, ARGV[6])
    else
        redis.call("hset", steps_key, step, result)
    end
    redis.call("expire", steps_key, ttl)
    if job[3] == "1" then
        return "cancel"
    end
    return "ok"

-- progress: KEYS job [, events]   ARGV seq, JSON progress   -> "ok" | "lost"
elseif command == "progress" then
    local job_key, events_key = KEYS[1], KEYS[2]
    local seq, progress = ARGV[2], ARGV[3]

    if redis.call("hget", job_key, "seq") ~= seq then
        return "lost"
    end
    redis.call("hset", job_key, "progress", progress)
    changed(events_key, job_key, "progress", progress)
    return "ok"

-- mark_running: KEYS job [, events]   ARGV seq   -> 1 (marked) | 0 (nothing to mark)
-- A run still in flight that has not reached a step (a job without steps is otherwise only
-- written once, when it ends) is shown as running: state and started_at only. The attempt is
-- counted by the run's own start or complete call, as it would be without this mark.
elseif command == "mark_running" then
    local job_key, events_key = KEYS[1], KEYS[2]
    local seq = ARGV[2]

    local job = redis.call("hmget", job_key, "engine", "state", "seq", "cancel", "attempts",
                           "started_at", "name", "queue", "enqueued_at")
    if job[1] ~= "dramatiq" or job[3] ~= seq or job[4] == "1"
        or (job[2] ~= "queued" and job[2] ~= "retrying") then
        return 0
    end
    local started_at = job[6] or now_ms()
    redis.call("hset", job_key, "state", "running", "started_at", started_at)
    changed(events_key, job_key, "state", "running", "name", job[7], "queue", job[8],
            "attempts", tonumber(job[5] or "0") + 1, "enqueued_at", job[9],
            "started_at", started_at)
    return 1

-- finish: KEYS job, steps, dramatiq acks, dramatiq msgs [, events]
--         ARGV seq, state, result JSON, error, error class, ttl s, redis message id, payload JSON,
--              traceback [, step name, JSON result, JSON timing]...
--         (the payload is kept for failed and dead jobs, so they can be replayed; the steps are
--         the run's returned steps not yet recorded with `step`: their results were committed
--         to the step journal, so their record could wait for this call, see DramatiqContext)
-- -> "ok" | "lost" | "cancelled".  A terminal state; the records expire after ttl. Acks the
-- Dramatiq message in the same call (Dramatiq's own ack is then skipped), saving a round trip
-- per job. "cancelled": the run brings steps and a cancel was asked for meanwhile: this call is
-- the step boundary where the run stops, and it ends cancelled, not succeeded.
elseif command == "finish" then
    local job_key, steps_key, acks_key, msgs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
    local events_key = KEYS[5]
    local seq, state, result = ARGV[2], ARGV[3], ARGV[4]
    local error_message, error_class, ttl = ARGV[5], ARGV[6], ARGV[7]
    local message_id, payload, traceback = ARGV[8], ARGV[9], ARGV[10]

    ack(acks_key, msgs_key, message_id)
    local job = redis.call("hmget", job_key, "engine", "seq", "name", "queue", "attempts",
                           "started_at", "cancel")
    if job[1] ~= "dramatiq" or job[2] ~= seq then
        return "lost"
    end
    local reply = "ok"
    if #ARGV >= 11 and state == "succeeded" and job[7] == "1" then
        state, result, reply = "cancelled", "null", "cancelled"
    end
    redis.call("hset", job_key, "state", state, "result", result, "error", error_message,
               "error_class", error_class, "finished_at", now_ms())
    if payload ~= "" then
        redis.call("hset", job_key, "payload", payload)
    end
    if traceback ~= "" then
        redis.call("hset", job_key, "traceback", traceback)
    end
    for i = 11, #ARGV, 3 do
        redis.call("hset", steps_key, ARGV[i], ARGV[i + 1], "__timing__:" .. ARGV[i], ARGV[i + 2])
    end
    redis.call("expire", job_key, ttl)
    redis.call("expire", steps_key, ttl)
    changed(events_key, job_key, "state", state, "name", job[3], "queue", job[4],
            "attempts", job[5], "started_at", job[6], "result", state == "succeeded" and result,
            "error", error_message, "error_class", error_class, "traceback", traceback,
            "payload", payload)
    return reply

-- complete: KEYS job, steps, dramatiq acks, dramatiq msgs [, events]
--           ARGV seq, is_resume, result JSON, ttl s, redis message id
-- -> {"ok", attempts, started_at ms} | {"lost"} | {"stale"} | {"done"} | {"cancelled"}.
-- start + finish + ack for a run that never used a step:
-- such a handler had no side effects, so checking ownership after it ran is safe.
elseif command == "complete" then
    -- A run without steps has no step record to expire: the steps key is passed but unused.
    local job_key, _steps_key, acks_key, msgs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
    local events_key = KEYS[5]
    local seq, is_resume, result, ttl, message_id = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]

    ack(acks_key, msgs_key, message_id)
    local status, attempts, started_at, job = start_checks(job_key, events_key, seq, is_resume)
    if status ~= "ok" then
        return {status}
    end
    -- With no earlier start, this run is the first.
    local now = now_ms()
    started_at = started_at or now
    redis.call("hset", job_key, "state", "succeeded", "result", result, "attempts", attempts,
               "started_seq", seq, "started_at", started_at, "finished_at", now)
    redis.call("expire", job_key, ttl)
    changed(events_key, job_key, "state", "succeeded", "name", job.name, "queue", job.queue,
            "attempts", attempts, "enqueued_at", job.enqueued_at, "started_at", started_at,
            "result", result)
    return {"ok", attempts, started_at}

-- reschedule: KEYS job, delay queue list, delay queue msgs, dramatiq acks, dramatiq msgs
--                  [, events]
--             ARGV seq, next seq, state, redis message id, message, error, error class,
--                  redis message id of the current message, when the next message is due (ms)
--                  [, hold_state, hold_reason: parked by a flow-control limit; KEYS 2 and 3 are
--                   then the queue's parked set and msgs hash
--                   [, "delayed": not held but waiting for other jobs or an event (ctx.children,
--                    ctx.wait_for_event): on the delay queue as a sleep, showing them
--                    [, "1": the wait's first look, its event "announced" in the job's history]]]
-- -> "ok" | "lost".  Puts the job's next message (a retry, or a resume after a sleep) on the
-- delay queue (or, held, in the parked set, due at its time), advances seq and acks the current
-- message in one step, so a crash can never leave two live messages, or none.
elseif command == "reschedule" then
    local job_key, delay_key, delay_msgs_key = KEYS[1], KEYS[2], KEYS[3]
    local acks_key, msgs_key, events_key = KEYS[4], KEYS[5], KEYS[6]
    local seq, next_seq, state, message_id, message = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
    local error_message, error_class, current_message_id = ARGV[7], ARGV[8], ARGV[9]
    local run_at = ARGV[10] or "0"

    ack(acks_key, msgs_key, current_message_id)
    local job = redis.call("hmget", job_key, "engine", "seq", "name", "queue", "attempts")
    if job[1] ~= "dramatiq" or job[2] ~= seq then
        return "lost"
    end
    redis.call("hset", job_key, "seq", next_seq, "state", state, "rmid", message_id,
               "error", error_message, "error_class", error_class, "run_at", run_at)
    redis.call("hset", delay_msgs_key, message_id, message)
    if ARGV[11] and ARGV[11] ~= "" then
        redis.call("hset", job_key, "hold_state", ARGV[11], "hold_reason", ARGV[12])
    end
    if ARGV[11] and ARGV[11] ~= "" and ARGV[13] ~= "delayed" then
        redis.call("zadd", delay_key, run_at, message_id)
    else
        redis.call("rpush", delay_key, message_id)
    end
    changed(events_key, job_key, "state", state, "name", job[3], "queue", job[4],
            "attempts", job[5], "run_at", run_at ~= "0" and run_at, "error", error_message,
            "error_class", error_class, "display_state", ARGV[11], "waiting_reason", ARGV[12],
            "announced", ARGV[14])
    return "ok"

-- handoff: KEYS job, queue list, queue msgs, delay list, delay msgs   ARGV name, queue, ttl s
-- -> {"claimed"} | {"lost", state}.  Gives the job to Temporal: removes a still-queued message
-- and marks the job Temporal's in one step. A job Dramatiq already started stays Dramatiq's.
elseif command == "handoff" then
    local job_key, queue_key, queue_msgs_key = KEYS[1], KEYS[2], KEYS[3]
    local delay_key, delay_msgs_key = KEYS[4], KEYS[5]
    local name, queue, ttl = ARGV[2], ARGV[3], ARGV[4]

    local job = redis.call("hmget", job_key, "engine", "state", "rmid", "started_at")
    if job[1] == false then
        redis.call("hset", job_key, "name", name, "queue", queue, "engine", "temporal",
                   "state", "queued", "enqueued_at", now_ms())
        redis.call("expire", job_key, ttl)
        return {"claimed"}
    end
    if job[1] == "temporal" then
        return {"claimed"}
    end
    -- Only a job that never started: Temporal cannot see the steps a started one recorded.
    if job[2] ~= "queued" or job[4] then
        return {"lost", job[2]}
    end
    remove_waiting_message(queue_key, queue_msgs_key, delay_key, delay_msgs_key, job[3])
    redis.call("hset", job_key, "engine", "temporal")
    return {"claimed"}

-- cancel: KEYS job, queue list, queue msgs, delay list, delay msgs   ARGV ttl s
-- -> {"cancelled"} | {"requested"} | {"done", state} | {"temporal"} | {"missing"}
-- A waiting job is cancelled at once (its message removed; a copy a worker already holds is
-- dropped by start_checks); a running one is flagged and stops at its next step boundary.
elseif command == "cancel" then
    local job_key, queue_key, queue_msgs_key = KEYS[1], KEYS[2], KEYS[3]
    local delay_key, delay_msgs_key = KEYS[4], KEYS[5]
    local ttl = ARGV[2]

    local job = redis.call("hmget", job_key, "engine", "state", "rmid")
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
    local parked = job[3] and redis.call("hdel", delay_msgs_key, job[3]) > 0
    if job[2] == "running" and not parked then
        redis.call("hset", job_key, "cancel", "1")
        return {"requested"}
    end
    remove_waiting_message(queue_key, queue_msgs_key, delay_key, delay_msgs_key, job[3])
    redis.call("hset", job_key, "state", "cancelled", "finished_at", now_ms())
    redis.call("expire", job_key, ttl)
    return {"cancelled"}

-- replay: KEYS job, queue list, queue msgs   ARGV expected seq, redis message id, message
-- -> {"ok"} | {"active", state} | {"temporal"} | {"missing"} | {"conflict"}
-- Runs a failed, dead or cancelled job again with a new seq; its finished steps stay recorded.
elseif command == "replay" then
    local job_key, queue_key, queue_msgs_key = KEYS[1], KEYS[2], KEYS[3]
    local next_seq, message_id, message = ARGV[2], ARGV[3], ARGV[4]

    local job = redis.call("hmget", job_key, "engine", "state", "seq")
    if job[1] == false then
        return {"missing"}
    end
    if job[1] ~= "dramatiq" then
        return {"temporal"}
    end
    if not TERMINAL[job[2]] or job[2] == "succeeded" then
        return {"active", job[2]}
    end
    if tostring(tonumber(job[3] or "0") + 1) ~= next_seq then
        return {"conflict"}
    end
    redis.call("hset", job_key, "state", "queued", "seq", next_seq, "rmid", message_id,
               "attempts", 0, "error", "", "error_class", "", "result", "",
               "enqueued_at", now_ms())
    redis.call("hdel", job_key, "cancel", "finished_at", "started_seq", "traceback", "lone",
               "lone_attempts", "died", "deaths")
    redis.call("persist", job_key)
    redis.call("hset", queue_msgs_key, message_id, message)
    redis.call("rpush", queue_key, message_id)
    return {"ok"}

-- rescue: KEYS workers zset, queue list, queue msgs, delay list, delay msgs, handoff list
--              [, bands [, parked set]]
--         ARGV heartbeat timeout ms, limit, job key prefix [, band prefix]
-- (Band lists are moved too, highest priority first, then the queue's list, then the delayed,
-- then the parked set's messages, each in turn.)
-- -> number of messages moved to the handoff list.
-- With no live worker for the queue, moves the messages of its unfinished jobs, waiting or
-- delayed (a dispatch delay, a retry backoff, a durable sleep), from the queue to the handoff
-- list and marks the jobs Temporal's, in one step; the caller starts them on Temporal with their
-- recorded steps and only then removes them from the handoff list, so a crash in between loses
-- nothing (a repeated start is refused by Temporal's workflow id). Messages held by dead
-- workers are returned to these lists first (Dramatiq's requeue); a stale copy (another seq) or
-- a job being cancelled stays where it is, for start_checks to drop.
-- (The job keys are built here from the prefix: jobyard runs on a single Redis, not a cluster.)
elseif command == "rescue" then
    local workers_key, queue_key, queue_msgs_key = KEYS[1], KEYS[2], KEYS[3]
    local delay_key, delay_msgs_key, handoff_key = KEYS[4], KEYS[5], KEYS[6]
    local timeout_ms, limit, job_prefix = ARGV[2], ARGV[3], ARGV[4]

    if live_workers(workers_key, timeout_ms) > 0 then
        return 0
    end
    local moved = 0
    local scanned = {}
    if KEYS[7] then
        for _, p in ipairs(redis.call("zrange", KEYS[7], 0, -1)) do
            scanned[#scanned + 1] = {ARGV[5] .. p, queue_msgs_key}
        end
    end
    scanned[#scanned + 1] = {queue_key, queue_msgs_key}
    scanned[#scanned + 1] = {delay_key, delay_msgs_key}
    if KEYS[8] then
        scanned[#scanned + 1] = {KEYS[8], queue_msgs_key, true}
    end
    for _, lists in ipairs(scanned) do
        local list_key, msgs_key, is_set = lists[1], lists[2], lists[3]
        local members = is_set and redis.call("zrange", list_key, 0, tonumber(limit) - 1)
                        or redis.call("lrange", list_key, 0, tonumber(limit) - 1)
        for _, message_id in ipairs(members) do
            local data = redis.call("hget", msgs_key, message_id)
            local message = data and cjson.decode(data)
            local job_id = message and message["args"][1]
            local job_key = job_id and (job_prefix .. job_id)
            local job = job_key and redis.call("hmget", job_key, "engine", "state", "seq", "cancel")
            local seq = message and tostring(message["options"]["jobyard_seq"] or 0)
            if job and job[1] == "dramatiq" and not TERMINAL[job[2]] and job[3] == seq
                    and job[4] ~= "1" then
                if is_set then
                    redis.call("zrem", list_key, message_id)
                else
                    redis.call("lrem", list_key, 1, message_id)
                end
                redis.call("hdel", msgs_key, message_id)
                redis.call("hset", job_key, "engine", "temporal")
                redis.call("rpush", handoff_key, data)
                moved = moved + 1
            end
        end
    end
    return moved

-- reclaim: KEYS dramatiq heartbeats, queue list, queue msgs, delay list, delay msgs, suspects
--               [, bands, band prefix (a prefix, in KEYS so that ARGV keeps its pairs)]
--               [, priority channel]
--          ARGV acks key prefix ("<namespace>:__acks__."), queue, delay queue, job key prefix,
--               dead before (ms: brokers whose heartbeat is older are dead; "0": none),
--               how those died, then (broker id, how it died) for each broker known dead
-- (A message requeued goes back to its band, at its front, see put_back; without the band
-- keys, to the queue's list.)
-- -> the number of messages taken as suspects.
-- Dramatiq's dead-worker requeue (dispatch.lua's maintenance), with jobyard's bookkeeping. Of
-- the messages a dead broker held of `queue`, the jobs that were running there are suspects (one
-- of them may have killed it): each, still live and of this seq, gets "died" and its message id
-- goes to the suspects list, for the caller to mark the message as a suspect's and requeue it
-- (`requeue_suspects`): a suspect runs alone in its process. Running is what the record shows: a
-- start under this seq, or "running" (a run without steps shows it after a second, see
-- mark_running). Whatever the record shows, a job whose message is held by a second dying
-- process is a suspect too (a handler that kills its process before its first step shows
-- nothing). The rest, fetched but not run, and stale or finished jobs' messages are requeued as
-- Dramatiq does (start_checks drops the latter); delayed messages go back to the delay queue. Brokers named dead (their supervisor saw the process
-- exit) are forgotten here; the others by Dramatiq's maintenance, which the caller runs after.
-- (Acks and job keys are built from prefixes, as rescue builds job keys.)
elseif command == "reclaim" then
    local heartbeats_key, queue_key, queue_msgs_key = KEYS[1], KEYS[2], KEYS[3]
    local delay_key, delay_msgs_key, suspects_key = KEYS[4], KEYS[5], KEYS[6]
    local bands_key, band_prefix, channel = KEYS[7], KEYS[8], KEYS[9]
    local acks_prefix, queue, delay_queue, job_prefix = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
    local dead_before, stale_beat = tonumber(ARGV[6]), ARGV[7]

    local dead = {}
    if dead_before > 0 then
        for _, broker in ipairs(redis.call("zrangebyscore", heartbeats_key, 0, dead_before)) do
            -- "<worker id>/<queue>" (see dramatiq_compat.broker_id_of), or a bare id
            local worker = string.match(broker, "^(.*)/[^/]*$") or broker
            dead[#dead + 1] = {broker, "worker " .. worker .. " " .. stale_beat, false}
        end
    end
    for i = 8, #ARGV - 1, 2 do
        dead[#dead + 1] = {ARGV[i], ARGV[i + 1], true}
    end
    local suspects = 0
    for _, entry in ipairs(dead) do
        local broker, died, named = entry[1], entry[2], entry[3]
        local acks_key = acks_prefix .. broker .. "." .. queue
        local requeued = {}
        for _, message_id in ipairs(redis.call("smembers", acks_key)) do
            local data = redis.call("hget", queue_msgs_key, message_id)
            if data then
                local ok, message = pcall(cjson.decode, data)
                local job_id = ok and type(message) == "table" and message["args"]
                               and message["args"][1]
                local job_key = type(job_id) == "string" and (job_prefix .. job_id)
                local job = job_key and redis.call("hmget", job_key, "engine", "state", "seq",
                                                   "cancel", "started_seq", "priority")
                local seq = ok and type(message) == "table" and message["options"]
                            and tostring(message["options"]["jobyard_seq"] or 0)
                local live = job and job[1] == "dramatiq" and not TERMINAL[job[2]]
                             and job[3] == seq and job[4] ~= "1"
                local deaths = live and redis.call("hincrby", job_key, "deaths", 1)
                if live and (job[5] == seq or job[2] == "running" or deaths > 1) then
                    redis.call("hset", job_key, "died", died)
                    redis.call("rpush", suspects_key, message_id)
                    suspects = suspects + 1
                else
                    local p = bands_key and job and tonumber(job[6]) or 0
                    requeued[#requeued + 1] = {message_id, p}
                end
            end
        end
        put_back(queue_key, bands_key, band_prefix, requeued, false, channel)
        redis.call("del", acks_key)
        local delay_acks_key = acks_prefix .. broker .. "." .. delay_queue
        for _, message_id in ipairs(redis.call("smembers", delay_acks_key)) do
            if redis.call("hexists", delay_msgs_key, message_id) > 0 then
                redis.call("rpush", delay_key, message_id)
            end
        end
        redis.call("del", delay_acks_key)
        if named then
            redis.call("zrem", heartbeats_key, broker)
        end
    end
    return suspects

-- requeue_suspects: KEYS suspects, queue list, queue msgs
--                        [, bands, band prefix, job key prefix (prefixes: ARGV keeps its pairs),
--                         priority channel]
--                   ARGV (message id, the message marked as a suspect's) for each
-- (A suspect goes back to its band, at its front, see put_back; without the band keys, to the
-- queue's list.)
-- -> the number requeued.  Each message still on the suspects list gets its marked data and
-- goes back on its queue; with "" for data it is dropped (its job was finished dead: see
-- jobyard.queue.reclaim), as is one a cancel or handoff removed meanwhile.
elseif command == "requeue_suspects" then
    local suspects_key, queue_key, queue_msgs_key = KEYS[1], KEYS[2], KEYS[3]
    local bands_key, band_prefix, job_prefix, channel = KEYS[4], KEYS[5], KEYS[6], KEYS[7]

    local requeued, entries = 0, {}
    for i = 2, #ARGV - 1, 2 do
        local message_id, data = ARGV[i], ARGV[i + 1]
        if redis.call("lrem", suspects_key, 0, message_id) > 0
                and redis.call("hexists", queue_msgs_key, message_id) > 0 then
            if data == "" then
                redis.call("hdel", queue_msgs_key, message_id)
            else
                redis.call("hset", queue_msgs_key, message_id, data)
                local p = bands_key and priority_of(job_prefix, data) or 0
                entries[#entries + 1] = {message_id, p}
                requeued = requeued + 1
            end
        end
    end
    put_back(queue_key, bands_key, band_prefix, entries, false, channel)
    return requeued

-- fetch: KEYS dramatiq heartbeats, this broker's acks of the queue, queue list, queue msgs, bands
--             [, parked set, priority channel]
--        ARGV broker id, timestamp ms, how many at most, band prefix [, job key prefix]
-- (First, up to that many parked messages now due enter their lists: one EXISTS when none wait.)
-- -> the messages' data, in the order to run them: bands p > 0 highest first, the queue's list,
--    bands p < 0. Dramatiq's fetch (dispatch.lua) otherwise: the broker's heartbeat, each id
--    into the acks set. A message whose data is gone (cancelled or handed off while waiting)
--    is dropped. A band found short of what was asked is empty: it leaves the index.
elseif command == "fetch" then
    local heartbeats_key, acks_key, queue_key, queue_msgs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
    local bands_key = KEYS[5]
    local broker_id, timestamp, wanted = ARGV[2], ARGV[3], math.min(tonumber(ARGV[4]), 1000)
    local band_prefix = ARGV[5]

    if KEYS[6] and redis.call("exists", KEYS[6]) == 1 then
        local due = redis.call("zrangebyscore", KEYS[6], "-inf", now_ms(), "LIMIT", 0, wanted)
        for _, message_id in ipairs(due) do
            unpark(KEYS[6], queue_key, queue_msgs_key, bands_key, band_prefix, ARGV[6], KEYS[7],
                   message_id)
        end
    end
    redis.call("zadd", heartbeats_key, timestamp, broker_id)
    local ids = {}
    local function take(list_key)
        local want = wanted - #ids
        if want <= 0 then
            return 0
        end
        local got = redis.call("lpop", list_key, want)
        if not got then
            return 0
        end
        for _, message_id in ipairs(got) do
            ids[#ids + 1] = message_id
        end
        return #got
    end
    local main_taken = false
    for _, p in ipairs(redis.call("zrange", bands_key, 0, -1)) do
        local priority = tonumber(p)
        if #ids >= wanted then
            break
        end
        if priority < 0 and not main_taken then
            main_taken = true
            take(queue_key)
        end
        local want = wanted - #ids
        if want > 0 and take(band_prefix .. p) < want then
            redis.call("zrem", bands_key, p)
        end
    end
    if not main_taken then
        take(queue_key)
    end
    if #ids == 0 then
        return {}
    end
    redis.call("sadd", acks_key, unpack(ids))
    local data = redis.call("hmget", queue_msgs_key, unpack(ids))
    local messages = {}
    for i = 1, #ids do
        if data[i] then
            messages[#messages + 1] = data[i]
        else
            redis.call("srem", acks_key, ids[i])
        end
    end
    return messages

-- requeue: KEYS this broker's acks of the queue, queue list, queue msgs, bands
--          ARGV job key prefix, band prefix, "first" | "last" (where priority 0 goes back),
--               message ids... (in the order they were fetched)
-- -> the number put back.  Dramatiq's requeue (fetched messages not run: a stop, a nack), each
-- to where it waited (see put_back); "first" restores the order they were fetched in (a worker
-- handing back its prefetched messages to fetch again, a priority > 0 having arrived). Ids no
-- longer in the acks set (acked meanwhile) stay acked.
elseif command == "requeue" then
    local acks_key, queue_key, queue_msgs_key, bands_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
    local job_prefix, band_prefix, zero_first = ARGV[2], ARGV[3], ARGV[4] == "first"

    local entries = {}
    for i = 5, #ARGV do
        local message_id = ARGV[i]
        if redis.call("srem", acks_key, message_id) > 0 then
            local data = redis.call("hget", queue_msgs_key, message_id)
            if data then
                entries[#entries + 1] = {message_id, priority_of(job_prefix, data)}
            end
        end
    end
    put_back(queue_key, bands_key, band_prefix, entries, zero_first)
    return #entries

-- hand_back: KEYS queue list, queue msgs, bands
--            ARGV job key prefix, band prefix, priority channel, redis message id, message
-- -> the job's priority.  A delayed message come due (a dispatch delay, a retry's backoff, a
-- sleep) enters its queue: Dramatiq's enqueue, into the job's band (at its back).
elseif command == "hand_back" then
    local queue_key, queue_msgs_key, bands_key = KEYS[1], KEYS[2], KEYS[3]
    local job_prefix, band_prefix, channel = ARGV[2], ARGV[3], ARGV[4]
    local message_id, message = ARGV[5], ARGV[6]

    local p = priority_of(job_prefix, message)
    redis.call("hset", queue_msgs_key, message_id, message)
    redis.call("rpush", waiting_list(queue_key, bands_key, band_prefix, p), message_id)
    if p > 0 then
        redis.call("publish", channel, p)
    end
    return p

-- wake: KEYS parked set, queue list, queue msgs, bands, priority channel
--       ARGV job key prefix, band prefix, job ids...
-- -> {how many were parked, the ids Dramatiq does not run...}.  The jobs' parked messages (if
-- they still wait there) enter their lists now: a flow-control slot was released for them
-- (docs/flow-control.md). The ids without a Dramatiq record (a job Temporal runs: none, or
-- a tombstone) are the waiters to wake on Temporal instead.
elseif command == "wake" then
    local parked_key, queue_key, queue_msgs_key, bands_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
    local job_prefix, band_prefix = ARGV[2], ARGV[3]

    local reply = {0}
    for i = 4, #ARGV do
        local job = redis.call("hmget", job_prefix .. ARGV[i], "rmid", "engine")
        local message_id = job[1]
        if job[2] ~= "dramatiq" then
            reply[#reply + 1] = ARGV[i]
        elseif message_id and redis.call("zscore", parked_key, message_id) then
            unpark(parked_key, queue_key, queue_msgs_key, bands_key, band_prefix, job_prefix,
                   KEYS[5], message_id, true)
            reply[1] = reply[1] + 1
        end
    end
    return reply

-- heartbeat: KEYS dramatiq heartbeats, workers zset per queue...
--            ARGV worker id, dramatiq broker id   -> now (ms)
elseif command == "heartbeat" then
    local heartbeats_key, worker_keys = KEYS[1], from(KEYS, 2)
    local worker_id, broker_id = ARGV[2], ARGV[3]

    local now = now_ms()
    redis.call("zadd", heartbeats_key, now, broker_id)
    for _, workers_key in ipairs(worker_keys) do
        redis.call("zadd", workers_key, now, worker_id)
    end
    return now

-- deregister: KEYS workers zset per queue...   ARGV worker id
elseif command == "deregister" then
    local worker_keys = from(KEYS, 1)
    local worker_id = ARGV[2]

    for _, workers_key in ipairs(worker_keys) do
        redis.call("zrem", workers_key, worker_id)
    end
    return "ok"

-- live_workers: KEYS workers zset   ARGV heartbeat timeout ms  -> count
-- Also forgets workers dead for ten timeouts, so the set does not grow forever.
elseif command == "live_workers" then
    local workers_key = KEYS[1]
    local timeout_ms = ARGV[2]

    local timeout = tonumber(timeout_ms)
    redis.call("zremrangebyscore", workers_key, "-inf", now_ms() - 10 * timeout)
    return live_workers(workers_key, timeout)

-- reseal: KEYS a hash (a job record, its steps, a queue's messages)
--         ARGV field, value read, value to write, field, ...   (`jobyard keys rotate`)
-- -> how many fields it wrote. Each is written only if it still holds the value read: one a
--    worker changed or deleted since was written with the new key already, or is gone. HSET
--    keeps the hash's TTL (a finished job's retention).
elseif command == "reseal" then
    local hash_key = KEYS[1]
    local written = 0

    for i = 2, #ARGV, 3 do
        if redis.call("hget", hash_key, ARGV[i]) == ARGV[i + 1] then
            redis.call("hset", hash_key, ARGV[i], ARGV[i + 2])
            written = written + 1
        end
    end
    return written

-- lease: KEYS lease   ARGV holder, ms   -> 1 if the holder has (or now takes) the lease, else 0
elseif command == "lease" then
    local lease_key = KEYS[1]
    local holder, ms = ARGV[2], ARGV[3]

    local current = redis.call("get", lease_key)
    if current and current ~= holder then
        return 0
    end
    redis.call("set", lease_key, holder, "px", ms)
    return 1
end

return redis.error_reply("jobyard.lua: unknown command " .. tostring(command))
