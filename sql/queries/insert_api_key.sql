INSERT INTO api_keys (user_id, name, prefix, key_hash)
VALUES ($1, $2, $3, $4)
RETURNING id, created_at
