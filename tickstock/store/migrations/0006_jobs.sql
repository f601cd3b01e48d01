-- Backtest jobs: submission with the per-user limit checked atomically, the
-- updates the daemon's batched writes apply from stored progress and result
-- events, and the index the timeout sweep reads.
DO $$
BEGIN
    ALTER TABLE jobs ADD CONSTRAINT jobs_status
        CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled'));
EXCEPTION WHEN duplicate_object THEN NULL;
END
$$;

CREATE INDEX IF NOT EXISTS jobs_active ON jobs (updated_at)
    WHERE status IN ('queued', 'running');

-- Inserts a queued job unless its user already has max_active queued or
-- running; users take turns (an advisory lock per user), so two nodes
-- cannot both let the last one in.
CREATE OR REPLACE FUNCTION tickstock_submit_job(
    j_id text, j_user text, j_params jsonb, j_at double precision, max_active integer
) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tickstock_jobs:' || j_user));
    IF (SELECT count(*) FROM jobs
        WHERE user_id = j_user AND status IN ('queued', 'running')) >= max_active THEN
        RETURN false;
    END IF;
    INSERT INTO jobs (job_id, user_id, status, params, progress, created_at, updated_at)
    VALUES (j_id, j_user, 'queued', j_params, 0, to_timestamp(j_at), to_timestamp(j_at));
    RETURN true;
END
$$;

-- Applies job updates in order; a job in a final state no longer changes,
-- so a retried batch, or a late event, does nothing.
CREATE OR REPLACE FUNCTION tickstock_update_jobs(
    u_id text[], u_status text[], u_progress double precision[], u_results text[],
    u_error text[], u_at double precision[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    u record;
BEGIN
    FOR u IN SELECT * FROM unnest(u_id, u_status, u_progress, u_results, u_error, u_at)
             WITH ORDINALITY AS t(id, status, progress, results, error, at, n) ORDER BY n
    LOOP
        UPDATE jobs SET status = u.status,
                        progress = coalesce(u.progress, progress),
                        results = coalesce(u.results::jsonb, results),
                        error = coalesce(u.error, error),
                        updated_at = greatest(updated_at, to_timestamp(u.at))
        WHERE job_id = u.id AND status IN ('queued', 'running');
    END LOOP;
END
$$;

REVOKE EXECUTE ON FUNCTION tickstock_submit_job(text, text, jsonb, double precision, integer)
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION tickstock_update_jobs(
    text[], text[], double precision[], text[], text[], double precision[]) FROM PUBLIC;
