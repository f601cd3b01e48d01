-- The universe functions the original system's callers use (docs/contract.md §6).
-- An ETF universe is the cache_entries row with type 'etf_universe',
-- environment 'DEFAULT' and key = the universe key; its value holds
-- {"symbols": [...]} plus any other keys. The functions run with the
-- caller's rights: a read-only role can call the readers, and writing needs
-- the rights on cache_entries as well as EXECUTE (revoked in 0004).

-- Per symbol, in the order given: does it look like a ticker (the rule of
-- symbols.symbol) and is it in the symbols table? NULL is neither.
CREATE OR REPLACE FUNCTION validate_etf_universe_symbols(p_symbols text[])
RETURNS TABLE (symbol text, valid_format boolean, known boolean)
LANGUAGE sql STABLE AS $$
    SELECT given.s,
           COALESCE(given.s ~ '^[A-Z0-9.\-]{1,10}$', false),
           EXISTS (SELECT 1 FROM symbols k WHERE k.symbol = given.s)
    FROM unnest(p_symbols) WITH ORDINALITY AS given (s, n)
    ORDER BY given.n
$$;

-- The universe's value ({"symbols": [...], ...}), or NULL if there is none.
CREATE OR REPLACE FUNCTION get_etf_universe(p_key text)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT value FROM cache_entries
    WHERE type = 'etf_universe' AND key = p_key AND environment = 'DEFAULT'
$$;

-- Create or replace an ETF universe's symbols. Symbols are kept in the order
-- given, duplicates dropped; other keys of the value are kept, and
-- p_metadata is merged into universe_metadata (its "name", if any, also
-- names the row); a NULL category keeps the current one ('ETF' for a new
-- universe). last_universe_update is set in UTC. Raises
-- invalid_parameter_value (22023), writing nothing, on a missing key or list,
-- or on any symbol that does not look like a ticker; whether the symbols are
-- known is not checked (see validate_etf_universe_symbols). Returns true.
CREATE OR REPLACE FUNCTION update_etf_universe(
    p_key text,
    p_symbols text[],
    p_category text DEFAULT 'ETF',
    p_metadata jsonb DEFAULT '{}'
)
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    bad text;
    cleaned jsonb;
BEGIN
    IF p_key IS NULL OR p_key = '' OR p_symbols IS NULL THEN
        RAISE EXCEPTION 'update_etf_universe: the key and the symbol list are required'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_metadata IS NOT NULL AND jsonb_typeof(p_metadata) <> 'object' THEN
        RAISE EXCEPTION 'update_etf_universe: metadata must be a JSON object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT string_agg(COALESCE(quote_literal(v.symbol), 'NULL'), ', ') INTO bad
    FROM validate_etf_universe_symbols(p_symbols) v WHERE NOT v.valid_format;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'update_etf_universe: not a valid symbol: %', bad
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Symbols are 1-10 of A-Z, 0-9, "." and "-".';
    END IF;
    SELECT COALESCE(jsonb_agg(first.s ORDER BY first.n), '[]') INTO cleaned
    FROM (SELECT s, min(n) AS n FROM unnest(p_symbols) WITH ORDINALITY AS u (s, n) GROUP BY s) first;

    INSERT INTO cache_entries AS c
        (type, name, key, value, environment, universe_category, universe_metadata,
         last_universe_update, updated_at)
    VALUES
        ('etf_universe', COALESCE(p_metadata->>'name', p_key), p_key,
         jsonb_build_object('symbols', cleaned), 'DEFAULT', COALESCE(p_category, 'ETF'),
         COALESCE(p_metadata, '{}'), now() AT TIME ZONE 'UTC', now())
    ON CONFLICT (type, key, environment) DO UPDATE SET
        name = COALESCE(p_metadata->>'name', c.name),
        value = CASE WHEN jsonb_typeof(c.value) = 'object' THEN c.value ELSE '{}' END
                || jsonb_build_object('symbols', cleaned),
        universe_category = CASE WHEN p_category IS NULL THEN c.universe_category
                                 ELSE EXCLUDED.universe_category END,
        universe_metadata = COALESCE(c.universe_metadata, '{}') || EXCLUDED.universe_metadata,
        last_universe_update = EXCLUDED.last_universe_update,
        updated_at = EXCLUDED.updated_at;
    RETURN true;
END;
$$;

-- One row per ETF universe, by key: its category, how many symbols it has
-- (0 if its value has no symbol list) and when it was last updated.
CREATE OR REPLACE FUNCTION get_etf_universes_summary()
RETURNS TABLE (key text, category text, symbol_count integer, last_update timestamp)
LANGUAGE sql STABLE AS $$
    SELECT c.key,
           c.universe_category::text,
           CASE WHEN jsonb_typeof(c.value->'symbols') = 'array'
                THEN jsonb_array_length(c.value->'symbols') ELSE 0 END,
           c.last_universe_update
    FROM cache_entries c
    WHERE c.type = 'etf_universe' AND c.environment = 'DEFAULT'
    ORDER BY c.key
$$;
