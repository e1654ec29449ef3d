SELECT id, user_id, key_hash, active, rate_limit_per_minute, last_used_at
FROM api_keys
WHERE key_hash = $1
