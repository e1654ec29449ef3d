-- Revokes a key of the user; revoking a revoked key changes nothing and still succeeds.
UPDATE api_keys
SET active = false, revoked_at = coalesce(revoked_at, now())
WHERE id = $1 AND user_id = $2
