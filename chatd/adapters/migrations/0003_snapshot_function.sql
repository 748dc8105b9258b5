-- A conversation's snapshot in one round trip (it took five: BEGIN, head,
-- committed replies, messages, COMMIT). STABLE: every statement inside runs
-- on the calling query's snapshot, so head and messages are consistent
-- without an explicit transaction.
--
-- Messages after p_after (all of them, if at most p_max_catchup), else the
-- latest p_limit. Each row repeats the head, whether the client's cursor was
-- recovered, and which of p_streams (in-flight reply ids) are already
-- committed; with no messages, one row of those with a NULL seq.
CREATE FUNCTION chatd_snapshot(
    p_conv text, p_after bigint, p_limit int, p_max_catchup bigint, p_streams text[]
) RETURNS TABLE (
    head bigint, recovered boolean, committed_streams text[], seq bigint, client_id text,
    user_id text, role text, status text, body text, created_at timestamptz
) LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_head bigint;
    v_done text[] := '{}';
    v_recovered boolean;
BEGIN
    SELECT c.head INTO v_head FROM conversations AS c WHERE c.id = p_conv;
    v_head := coalesce(v_head, 0);
    IF cardinality(p_streams) > 0 THEN
        SELECT coalesce(array_agg(m.client_id), '{}') INTO v_done
        FROM messages AS m WHERE m.conv_id = p_conv AND m.client_id = ANY(p_streams);
    END IF;
    IF p_after IS NOT NULL AND v_head - p_after <= p_max_catchup THEN
        v_recovered := true;
        RETURN QUERY
            SELECT v_head, v_recovered, v_done, m.seq, m.client_id, m.user_id, m.role,
                   m.status, m.body, m.created_at
            FROM messages AS m WHERE m.conv_id = p_conv AND m.seq > p_after ORDER BY m.seq;
    ELSE
        v_recovered := p_after IS NULL;
        RETURN QUERY
            SELECT v_head, v_recovered, v_done, t.* FROM (
                SELECT m.seq, m.client_id, m.user_id, m.role, m.status, m.body, m.created_at
                FROM messages AS m WHERE m.conv_id = p_conv ORDER BY m.seq DESC LIMIT p_limit
            ) AS t ORDER BY t.seq;
    END IF;
    IF NOT FOUND THEN
        RETURN QUERY SELECT v_head, v_recovered, v_done, NULL::bigint, NULL::text, NULL::text,
                            NULL::text, NULL::text, NULL::text, NULL::timestamptz;
    END IF;
END;
$$;
