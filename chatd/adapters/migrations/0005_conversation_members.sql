-- Who may read and write a conversation beyond what their tokens grant
-- (docs/security.md). The application manages these rows, or an operator
-- with `chatd grant` / `chatd revoke`; chatd re-reads the rows a process
-- relies on every [auth].membership_ttl seconds, so a revoked member loses a
-- live subscription within that bound.
CREATE TABLE conversation_members (
    conv_id     text NOT NULL,
    user_id     text NOT NULL,
    can_read    boolean NOT NULL DEFAULT true,
    can_write   boolean NOT NULL DEFAULT true,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conv_id, user_id)
);
CREATE INDEX conversation_members_user ON conversation_members (user_id);
