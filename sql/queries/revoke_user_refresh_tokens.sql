-- Ends every refresh token of the user who owns token $1, used after a token is reused.
UPDATE refresh_tokens
SET used_at = coalesce(used_at, now())
WHERE user_id = (SELECT user_id FROM refresh_tokens WHERE jti = $1)
