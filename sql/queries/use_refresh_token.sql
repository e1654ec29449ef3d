-- Marks an unused, unexpired refresh token as used; returns nothing when it was
-- already used, has expired or does not exist.
UPDATE refresh_tokens
SET used_at = now()
WHERE jti = $1 AND used_at IS NULL AND expires_at > now()
RETURNING user_id, token_hash
