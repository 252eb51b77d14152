-- Headers are a JSON object (trace, tenant and correlation ids by name); the
-- library refuses anything else, and now so does the table, so rows written
-- through outbox_enqueue() or plain SQL obey the same rule.
-- NOT VALID: an upgrade does not scan (or fail on) rows already stored.
ALTER TABLE outbox
    ADD CONSTRAINT outbox_headers_object CHECK (jsonb_typeof(headers) = 'object') NOT VALID;
