-- A group commit in one round trip (it used to take nine): lock the batch's
-- conversations in a fixed order, find sends committed before (idempotency),
-- assign gapless seqs from each conversation's head, write message and outbox
-- rows, advance the heads and wake the relays, all in the caller's transaction.
--
-- Arguments are parallel arrays, one element per send, in arrival order.
-- The outbox payload is the live event's JSON, encoded by chatd except for
-- the two values only known here: p_head || seq || p_mid || ts || '}'.
-- Returns one row per send, in order: its seq, whether it was committed
-- before (by an earlier batch, or earlier in this one), and the message as
-- stored (for a duplicate, the original's content).
CREATE FUNCTION chatd_commit(
    p_conv text[], p_client text[], p_user text[], p_role text[], p_status text[],
    p_body text[], p_head text[], p_mid text[]
) RETURNS TABLE (
    ord bigint, seq bigint, duplicate boolean, user_id text, role text, status text,
    body text, created_at timestamptz
) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO conversations AS c (id)
        SELECT DISTINCT x FROM unnest(p_conv) AS x ORDER BY x
        ON CONFLICT DO NOTHING;
    -- Fixed order, so concurrent batches cannot deadlock. In READ COMMITTED the
    -- next statement takes a fresh snapshot: it sees every commit made before
    -- these locks were granted.
    PERFORM 1 FROM conversations AS c WHERE c.id = ANY(p_conv) ORDER BY c.id FOR UPDATE;
    RETURN QUERY
    WITH input AS (
        SELECT t.*,
               row_number() OVER (PARTITION BY t.conv, t.client ORDER BY t.n) AS occurrence
        FROM unnest(p_conv, p_client, p_user, p_role, p_status, p_body, p_head, p_mid)
             WITH ORDINALITY AS t(conv, client, usr, rol, stat, txt, head, mid, n)
    ),
    prior AS (
        SELECT i.n, m.seq, m.user_id, m.role, m.status, m.body, m.created_at
        FROM input AS i
        JOIN messages AS m ON m.conv_id = i.conv AND m.client_id = i.client
    ),
    fresh AS (
        SELECT i.*,
               c.head + row_number() OVER (PARTITION BY i.conv ORDER BY i.n) AS new_seq
        FROM input AS i
        JOIN conversations AS c ON c.id = i.conv
        WHERE i.occurrence = 1 AND NOT EXISTS (SELECT 1 FROM prior AS p WHERE p.n = i.n)
    ),
    ins AS (
        INSERT INTO messages (conv_id, seq, client_id, user_id, role, status, body, created_at)
        SELECT f.conv, f.new_seq, f.client, f.usr, f.rol, f.stat, f.txt, now() FROM fresh AS f
    ),
    ob AS (
        -- Ordered so outbox ids follow seq within a conversation.
        INSERT INTO outbox (conv_id, seq, payload)
        SELECT f.conv, f.new_seq,
               f.head || f.new_seq || f.mid
               || floor(extract(epoch FROM now()) * 1000)::bigint || '}'
        FROM fresh AS f ORDER BY f.conv, f.new_seq
    ),
    heads AS (
        UPDATE conversations AS c SET head = top.seq
        FROM (SELECT f.conv, max(f.new_seq) AS seq FROM fresh AS f GROUP BY f.conv) AS top
        WHERE c.id = top.conv
    )
    SELECT i.n,
           coalesce(p.seq, f.new_seq),
           p.n IS NOT NULL OR f.n <> i.n,
           coalesce(p.user_id, f.usr),
           coalesce(p.role, f.rol),
           coalesce(p.status, f.stat),
           coalesce(p.body, f.txt),
           coalesce(p.created_at, now())
    FROM input AS i
    LEFT JOIN prior AS p ON p.n = i.n
    LEFT JOIN fresh AS f ON f.conv = i.conv AND f.client = i.client
    ORDER BY i.n;
    -- Delivered at commit: wakes every relay without waiting for its poll.
    PERFORM pg_notify('chatd_outbox', '');
END;
$$;
