-- Streams mode: per node (stream consumer) and symbol, the newest tick id
-- the node's stored bar parts hold, raised in the same transaction as the
-- parts. A restarted node reads its unacknowledged entries again; the ticks
-- among them at or below its mark are in parts already and are skipped, so
-- a tick is never counted in two parts (tickstock/persist.py).
CREATE TABLE IF NOT EXISTS ohlcv_1min_tick_marks (
    node      text NOT NULL,
    symbol    text NOT NULL,
    tick_ms   bigint NOT NULL,
    tick_seq  bigint NOT NULL,
    PRIMARY KEY (node, symbol)
);

-- Raises node's marks (never lowers them: a spool file written back late
-- holds older ones). Called in the statement that writes the parts.
CREATE OR REPLACE FUNCTION tickstock_mark_ticks(
    m_node text, m_symbol text[], m_ms bigint[], m_seq bigint[]
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO ohlcv_1min_tick_marks AS k (node, symbol, tick_ms, tick_seq)
    SELECT m_node, s, ms, seq FROM unnest(m_symbol, m_ms, m_seq) AS t(s, ms, seq)
    ON CONFLICT (node, symbol) DO UPDATE SET
        tick_ms = EXCLUDED.tick_ms, tick_seq = EXCLUDED.tick_seq
    WHERE (k.tick_ms, k.tick_seq) < (EXCLUDED.tick_ms, EXCLUDED.tick_seq)
$$;

-- node's marks, read at start. It first waits its turn with the bar writers
-- (their lock), so a write still running from before a crash is seen.
CREATE OR REPLACE FUNCTION tickstock_tick_marks(m_node text)
RETURNS TABLE (symbol text, tick_ms bigint, tick_seq bigint) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tickstock_write_bars'));
    RETURN QUERY SELECT k.symbol, k.tick_ms, k.tick_seq
                 FROM ohlcv_1min_tick_marks k WHERE k.node = m_node;
END
$$;

REVOKE EXECUTE ON FUNCTION tickstock_mark_ticks(text, text[], bigint[], bigint[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tickstock_tick_marks(text) FROM PUBLIC;
