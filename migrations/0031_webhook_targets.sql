-- A signing secret per webhook target (app and URL): generated when the
-- target is created and shown once, rotatable. After a rotation the
-- previous secret signs too until previous_until, so receivers can switch
-- over without a gap. A target without a row here is signed with the
-- global webhook.secret, when one is set.
CREATE TABLE webhook_targets (
    app_id          uuid        NOT NULL REFERENCES apps (id) ON DELETE CASCADE,
    url             text        NOT NULL CHECK (url ~ '^https?://' AND length(url) <= 2048),
    secret          text        NOT NULL,
    previous_secret text,
    previous_until  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    rotated_at      timestamptz,
    PRIMARY KEY (app_id, url)
);
