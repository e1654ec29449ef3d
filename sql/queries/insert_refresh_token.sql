INSERT INTO refresh_tokens (jti, user_id, token_hash, expires_at)
VALUES ($1, $2, $3, $4)
