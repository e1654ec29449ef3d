-- The W3C trace context a client sent with an event, so that its logs can be found from a
-- trace. Both hold lowercase hex digits: 32 for the trace id, 16 for the span id.
ALTER TABLE logs
    ADD COLUMN trace_id text,
    ADD COLUMN span_id  text;
CREATE INDEX logs_user_trace_idx ON logs (user_id, trace_id) WHERE trace_id IS NOT NULL;
