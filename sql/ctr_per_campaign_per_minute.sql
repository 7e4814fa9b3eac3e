-- Impressions, attributed clicks and click-through rate per campaign and minute of impression
-- time. A click counts in the minute of the impression it is attributed to, so CTR compares
-- like with like. Runs unchanged on Athena engine v3 (Trino) and DuckDB.
WITH impression_counts AS (
    SELECT campaign_id,
           date_trunc('minute', impression_time) AS minute_start,
           count(*) AS impressions
    FROM impressions
    GROUP BY 1, 2
),
click_counts AS (
    SELECT campaign_id,
           date_trunc('minute', impression_time) AS minute_start,
           count(*) AS clicks
    FROM enriched_clicks
    GROUP BY 1, 2
)
SELECT coalesce(i.campaign_id, c.campaign_id) AS campaign_id,
       coalesce(i.minute_start, c.minute_start) AS minute_start,
       coalesce(i.impressions, 0) AS impressions,
       coalesce(c.clicks, 0) AS clicks,
       CAST(coalesce(c.clicks, 0) AS DOUBLE) / NULLIF(coalesce(i.impressions, 0), 0) AS ctr
FROM impression_counts AS i
FULL OUTER JOIN click_counts AS c
    ON i.campaign_id = c.campaign_id AND i.minute_start = c.minute_start
ORDER BY 1, 2
