SELECT id, name, prefix, active, rate_limit_per_minute, created_at, last_used_at
FROM api_keys
WHERE user_id = $1
ORDER BY id
