-- Plan limits: key count, total storage and operations per second.
--
-- Accuracy: usage is exact for every committed state. A write checks the
-- committed usage before it writes, so writers of one app that run at the
-- same moment can each pass the check. They overshoot a limit by at most
-- one key (and its bytes) per concurrent writer. Sequential writers never do.
-- The rate limit counts committed requests in one-second windows and
-- weights the previous window by the part of it that still overlaps the
-- last second (a sliding-window estimate).

CREATE FUNCTION kvapi_data.add_usage(p_app_id text, p_ephemeral boolean, p_keys integer, p_bytes bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_shard integer := pg_backend_pid();
BEGIN
    IF p_keys = 0 AND p_bytes = 0 THEN
        RETURN;
    END IF;
    IF p_ephemeral THEN
        INSERT INTO kvapi_data.ephemeral_usage_counters AS c (app_id, shard, keys, bytes)
        VALUES (p_app_id, v_shard, p_keys, p_bytes)
        ON CONFLICT (app_id, shard) DO UPDATE SET keys = c.keys + excluded.keys, bytes = c.bytes + excluded.bytes;
    ELSE
        INSERT INTO kvapi_data.usage_counters AS c (app_id, shard, keys, bytes)
        VALUES (p_app_id, v_shard, p_keys, p_bytes)
        ON CONFLICT (app_id, shard) DO UPDATE SET keys = c.keys + excluded.keys, bytes = c.bytes + excluded.bytes;
    END IF;
END
$$;

-- Live keys and bytes of an app in both tiers: the counters minus the rows
-- that have expired but are not purged yet.
CREATE FUNCTION kvapi_data.live_usage(p_app_id text, p_now timestamptz, OUT keys bigint, OUT bytes bigint)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_expired_keys bigint;
    v_expired_bytes bigint;
BEGIN
    SELECT coalesce(sum(c.keys), 0), coalesce(sum(c.bytes), 0) INTO keys, bytes
    FROM (SELECT u.keys, u.bytes FROM kvapi_data.usage_counters u WHERE u.app_id = p_app_id
          UNION ALL
          SELECT u.keys, u.bytes FROM kvapi_data.ephemeral_usage_counters u WHERE u.app_id = p_app_id) c;

    SELECT count(*), coalesce(sum(x.size_bytes), 0) INTO v_expired_keys, v_expired_bytes
    FROM (SELECT d.size_bytes FROM kvapi_data.entries d WHERE d.app_id = p_app_id AND d.expires_at <= p_now
          UNION ALL
          SELECT e.size_bytes FROM kvapi_data.ephemeral_entries e WHERE e.app_id = p_app_id AND e.expires_at <= p_now) x;

    keys := keys - v_expired_keys;
    bytes := bytes - v_expired_bytes;
END
$$;

-- Raise KVKEY or KVFUL when adding p_added_keys keys and p_added_bytes bytes
-- would take the app over its plan. Writes that do not grow usage always
-- pass, so a full app can still overwrite, shrink and delete.
CREATE FUNCTION kvapi_data.check_quota(p_plan kvapi_data.plans, p_app_id text, p_now timestamptz,
    p_added_keys integer, p_added_bytes bigint)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_usage record;
BEGIN
    IF (p_plan.max_keys IS NULL OR p_added_keys <= 0)
       AND (p_plan.max_total_bytes IS NULL OR p_added_bytes <= 0) THEN
        RETURN;
    END IF;
    SELECT * INTO v_usage FROM kvapi_data.live_usage(p_app_id, p_now);

    IF p_plan.max_keys IS NOT NULL AND p_added_keys > 0
       AND v_usage.keys + p_added_keys > p_plan.max_keys THEN
        RAISE EXCEPTION USING ERRCODE = 'KVKEY',
            MESSAGE = format('app %L would reach %s keys, over the plan limit of %s keys',
                             p_app_id, v_usage.keys + p_added_keys, p_plan.max_keys),
            DETAIL = json_build_object('limit', p_plan.max_keys, 'actual', v_usage.keys + p_added_keys)::text,
            HINT = 'Delete keys, let them expire, or move the app to a plan with more keys.';
    END IF;
    IF p_plan.max_total_bytes IS NOT NULL AND p_added_bytes > 0
       AND v_usage.bytes + p_added_bytes > p_plan.max_total_bytes THEN
        RAISE EXCEPTION USING ERRCODE = 'KVFUL',
            MESSAGE = format('app %L would store %s bytes, over the plan limit of %s bytes',
                             p_app_id, v_usage.bytes + p_added_bytes, p_plan.max_total_bytes),
            DETAIL = json_build_object('limit', p_plan.max_total_bytes, 'actual', v_usage.bytes + p_added_bytes)::text,
            HINT = 'Delete keys, store smaller values, or move the app to a plan with more storage.';
    END IF;
END
$$;

-- Count one request against the app's operations per second, or raise
-- KVRAT (with retry_after in DETAIL) and count nothing. The count is part of
-- the caller's transaction, so an operation that fails afterwards takes it
-- back (kvapi.kv_count_request restores it for the HTTP API). The estimate is
-- previous * (1 - elapsed) + current, where elapsed is the fraction of the
-- current second that has passed.
CREATE FUNCTION kvapi_data.check_rate(p_app_id text, p_ops_per_second integer) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_clock numeric;
    v_window bigint;
    v_elapsed numeric;
    v_current bigint;
    v_previous bigint;
    v_wait numeric;
BEGIN
    IF p_ops_per_second IS NULL THEN
        RETURN;
    END IF;
    v_clock := extract(epoch FROM clock_timestamp());
    v_window := floor(v_clock);
    v_elapsed := v_clock - v_window;

    SELECT coalesce(sum(w.requests) FILTER (WHERE w.window_start = v_window), 0),
           coalesce(sum(w.requests) FILTER (WHERE w.window_start = v_window - 1), 0)
    INTO v_current, v_previous
    FROM kvapi_data.rate_windows w
    WHERE w.app_id = p_app_id AND w.window_start >= v_window - 1;

    IF v_previous * (1 - v_elapsed) + v_current + 1 > p_ops_per_second THEN
        IF v_current + 1 <= p_ops_per_second AND v_previous > 0 THEN
            -- The previous second's weight fades within this second.
            v_wait := 1 - (p_ops_per_second - 1 - v_current) / v_previous::numeric - v_elapsed;
        ELSE
            -- Wait for the next second, then for this one's weight to fade.
            v_wait := (1 - v_elapsed) + greatest(0, 1 - (p_ops_per_second - 1) / greatest(v_current, 1)::numeric);
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'KVRAT',
            MESSAGE = format('app %L is over its limit of %s operations per second', p_app_id, p_ops_per_second),
            DETAIL = json_build_object('limit', p_ops_per_second, 'retry_after', greatest(1, ceil(v_wait)::integer))::text,
            HINT = 'Retry after the number of seconds in retry_after, or move the app to a plan with a higher rate.';
    END IF;

    INSERT INTO kvapi_data.rate_windows AS w (app_id, window_start, shard, requests)
    VALUES (p_app_id, v_window, pg_backend_pid(), 1)
    ON CONFLICT (app_id, window_start, shard) DO UPDATE SET requests = w.requests + 1;
END
$$;

-- Count one request of p_app_id without checking the limit. The HTTP server
-- calls it after an operation failed, because the failed operation's own
-- count was rolled back with it and failing requests must be throttled too.
CREATE FUNCTION kvapi.kv_count_request(p_app_id text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM kvapi_data.check_caller(p_app_id);
    IF (SELECT p.ops_per_second FROM kvapi_data.apps a JOIN kvapi_data.plans p ON p.plan_id = a.plan_id
        WHERE a.app_id = p_app_id) IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO kvapi_data.rate_windows AS w (app_id, window_start, shard, requests)
    VALUES (p_app_id, floor(extract(epoch FROM clock_timestamp())), pg_backend_pid(), 1)
    ON CONFLICT (app_id, window_start, shard) DO UPDATE SET requests = w.requests + 1;
END
$$;
