-- Users, their API keys and refresh tokens, and the ingested logs.

CREATE TABLE users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      text        NOT NULL,
    email         text        NOT NULL,
    -- argon2id in PHC string format.
    password_hash text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_username_key ON users (username);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE api_keys (
    id                    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id               bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name                  text        NOT NULL,
    -- The first characters of the key, shown so that users can tell their keys apart.
    prefix                text        NOT NULL,
    -- SHA-256 of the whole key; the key itself is never stored.
    key_hash              bytea       NOT NULL UNIQUE,
    active                boolean     NOT NULL DEFAULT true,
    -- NULL means the configured default limit.
    rate_limit_per_minute integer     CHECK (rate_limit_per_minute > 0),
    created_at            timestamptz NOT NULL DEFAULT now(),
    last_used_at          timestamptz,
    revoked_at            timestamptz
);
CREATE INDEX api_keys_user_id_idx ON api_keys (user_id, id);

CREATE TABLE refresh_tokens (
    -- The token's `jti` claim.
    jti        uuid        PRIMARY KEY,
    user_id    bigint      NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- SHA-256 of the whole token.
    token_hash bytea       NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Set when the token is exchanged; a used token is never accepted again.
    used_at    timestamptz
);
CREATE INDEX refresh_tokens_user_id_idx ON refresh_tokens (user_id);

-- One row per event. The key is (user_id, id) so that a client-chosen event id can only
-- collide with the same user's own events, which is what makes a retried event idempotent.
CREATE TABLE logs (
    id              uuid        NOT NULL,
    user_id         bigint      NOT NULL,
    api_key_id      bigint      NOT NULL,
    service_name    text        NOT NULL,
    -- The level text as the client sent it, and its OpenTelemetry severity.
    level           text        NOT NULL,
    severity_text   text        NOT NULL,
    severity_number smallint    NOT NULL,
    message         text        NOT NULL,
    "timestamp"     timestamptz NOT NULL,
    received_at     timestamptz NOT NULL,
    attributes      jsonb       NOT NULL DEFAULT '{}',
    PRIMARY KEY (user_id, id)
);
CREATE INDEX logs_user_timestamp_idx ON logs (user_id, "timestamp");
CREATE INDEX logs_user_service_timestamp_idx ON logs (user_id, service_name, "timestamp");
