-- Writes a batch of events; an event whose (user_id, id) is already stored is skipped,
-- so a redelivered Kafka message never makes a second row.
INSERT INTO logs (id, user_id, api_key_id, service_name, level, severity_text,
                  severity_number, message, "timestamp", received_at, attributes,
                  trace_id, span_id)
SELECT *
FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::text[], $5::text[], $6::text[],
            $7::int2[], $8::text[], $9::timestamptz[], $10::timestamptz[], $11::jsonb[],
            $12::text[], $13::text[])
ON CONFLICT (user_id, id) DO NOTHING
