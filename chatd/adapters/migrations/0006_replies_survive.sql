-- Replies that survive their process (issue 15; docs/reliability.md).
--
-- A reply whose process died is committed with what is known of it, as
-- status 'interrupted'.
ALTER TABLE messages DROP CONSTRAINT messages_status_check;
ALTER TABLE messages ADD CONSTRAINT messages_status_check
    CHECK (status IN ('complete', 'stopped', 'interrupted'));

-- Every chatd process holds a lease it renews; one that stops renewing is
-- presumed dead (dead = true) and its replies are taken over. A process that
-- finds itself marked dead is fenced: it gives up its replies and starts over
-- under a new id.
CREATE TABLE chatd_processes (
    id          text PRIMARY KEY,
    lease_until timestamptz NOT NULL,
    dead        boolean NOT NULL DEFAULT false,
    started_at  timestamptz NOT NULL DEFAULT now()
);

-- Replies generating now: who owns each, and, with [streams].persistence =
-- "checkpoint", the text so far (appended in batches as it generates). The
-- message log itself holds only finished messages; a reply's final commit
-- deletes its row in the same statement.
CREATE TABLE replies_in_flight (
    stream_id   text PRIMARY KEY,
    conv_id     text NOT NULL,
    owner       text NOT NULL,
    meta        text NOT NULL,
    body        text NOT NULL DEFAULT '',
    length      integer NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX replies_in_flight_owner ON replies_in_flight (owner);
CREATE INDEX replies_in_flight_conv ON replies_in_flight (conv_id);
