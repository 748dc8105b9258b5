-- Conversations: one row per conversation; `head` is the last assigned seq.
-- Row-locking it serialises writers per conversation, so seqs are gapless.
CREATE TABLE conversations (
    id          text PRIMARY KEY,
    head        bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The message log: grows forever. The primary key (conv_id, seq) is the only
-- index reads need: snapshot, catch-up after a cursor and history pages are
-- range scans over one conversation's rows, independent of table size.
CREATE TABLE messages (
    conv_id     text NOT NULL,
    seq         bigint NOT NULL,
    client_id   text NOT NULL,
    user_id     text NOT NULL,
    role        text NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    status      text NOT NULL DEFAULT 'complete' CHECK (status IN ('complete', 'stopped')),
    body        text NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (conv_id, seq),
    -- Idempotent send: a client message id lands at most once per conversation.
    UNIQUE (conv_id, client_id)
);

-- The outbox: events committed but not yet published to Redis. Nearly empty in
-- steady state; the relay claims rows with FOR UPDATE SKIP LOCKED and deletes
-- them only after the publish succeeded.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    conv_id     text NOT NULL,
    seq         bigint NOT NULL,
    payload     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
