-- Marks a task as followed until ARGV[1] (ms since the epoch): its transitions announce
-- their events on the events channel until then (lib.lua: ev_announce). Nothing for a task
-- that does not exist.
-- KEYS[1] task hash   ARGV[1] until
-- Returns 1 when marked, 0 when there is no such task.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], F.watched_until, ARGV[1])
return 1
