-- Publish after commit (the fast path): chatd_commit now returns each new
-- outbox row's id and payload, so the committing process publishes them to
-- Redis itself at once, and deletes the rows it published in its next
-- commit (p_published), instead of a relay transaction per batch. The relay
-- remains the safety net for rows nobody published (Redis was down, the
-- process died): see chatd/relay.py. NOTIFY is sent only when asked
-- (p_notify: the caller's own publishing is failing).

DROP FUNCTION chatd_commit(text[], text[], text[], text[], text[], text[], text[], text[]);

CREATE FUNCTION chatd_commit(
    p_conv text[], p_client text[], p_user text[], p_role text[], p_status text[],
    p_body text[], p_head text[], p_mid text[], p_published bigint[], p_notify boolean
) RETURNS TABLE (
    ord bigint, seq bigint, duplicate boolean, user_id text, role text, status text,
    body text, created_at timestamptz, outbox_id bigint, payload text
) LANGUAGE plpgsql AS $$
BEGIN
    -- Rows this process already published leave with this transaction. SKIP
    -- LOCKED: a relay holding one deletes it itself, and a commit never waits
    -- for a relay's Redis round trip.
    IF cardinality(p_published) > 0 THEN
        DELETE FROM outbox WHERE id IN (
            SELECT o.id FROM outbox AS o WHERE o.id = ANY(p_published) FOR UPDATE SKIP LOCKED
        );
    END IF;
    IF coalesce(cardinality(p_conv), 0) = 0 THEN
        RETURN;
    END IF;
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
        RETURNING outbox.id, outbox.conv_id, outbox.seq, outbox.payload
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
           coalesce(p.created_at, now()),
           o.id,
           o.payload
    FROM input AS i
    LEFT JOIN prior AS p ON p.n = i.n
    LEFT JOIN fresh AS f ON f.conv = i.conv AND f.client = i.client
    LEFT JOIN ob AS o ON f.n = i.n AND o.conv_id = f.conv AND o.seq = f.new_seq
    ORDER BY i.n;
    -- Only while the caller cannot publish its own commits: wakes every relay
    -- (in any process) to publish them instead of waiting for its poll.
    IF p_notify THEN
        PERFORM pg_notify('chatd_outbox', '');
    END IF;
END;
$$;
