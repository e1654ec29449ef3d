UPDATE api_keys
SET rate_limit_per_minute = $3
WHERE id = $1 AND user_id = $2
RETURNING id, name, prefix, active, rate_limit_per_minute, created_at, last_used_at
