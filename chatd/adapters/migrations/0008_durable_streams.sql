-- Durable Streams (docs/durable-streams.md): each stream's state, its data in
-- chunks (one append of bytes, or one JSON message) covering positions
-- [pos, stop), and its idempotent producers. A stream's row is locked for the
-- length of every append, which serializes producers per stream.
CREATE TABLE ds_streams (
    id           bigserial PRIMARY KEY,
    path         text NOT NULL UNIQUE,
    content_type text NOT NULL,
    ttl          integer,
    expires_at   double precision,   -- wall clock, seconds since 1970
    closed       boolean NOT NULL DEFAULT false,
    tail         bigint NOT NULL DEFAULT 0,
    touched      double precision NOT NULL,
    closed_by    text,               -- JSON [producer, epoch, seq]
    stream_seq   text,
    fork_of      text,
    fork_pos     bigint,
    deleted      boolean NOT NULL DEFAULT false,
    refs         integer NOT NULL DEFAULT 0
);

CREATE TABLE ds_chunks (
    stream_id bigint NOT NULL REFERENCES ds_streams (id) ON DELETE CASCADE,
    pos       bigint NOT NULL,
    stop      bigint NOT NULL,
    data      bytea NOT NULL,
    PRIMARY KEY (stream_id, pos)
);

CREATE TABLE ds_producers (
    stream_id   bigint NOT NULL REFERENCES ds_streams (id) ON DELETE CASCADE,
    producer_id text NOT NULL,
    epoch       bigint NOT NULL,
    seq         bigint NOT NULL,
    PRIMARY KEY (stream_id, producer_id)
);

-- Reads ask for the chunks ending after an offset.
CREATE INDEX ds_chunks_stop ON ds_chunks (stream_id, stop);
