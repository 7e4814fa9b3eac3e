-- Impressions and attributed clicks per device category (platform_category, derived from the
-- impression's device_type) and minute of impression time.
WITH impression_counts AS (
    SELECT platform_category,
           date_trunc('minute', impression_time) AS minute_start,
           count(*) AS impressions
    FROM impressions
    GROUP BY 1, 2
),
click_counts AS (
    SELECT platform_category,
           date_trunc('minute', impression_time) AS minute_start,
           count(*) AS clicks
    FROM enriched_clicks
    GROUP BY 1, 2
)
SELECT coalesce(i.platform_category, c.platform_category) AS platform_category,
       coalesce(i.minute_start, c.minute_start) AS minute_start,
       coalesce(i.impressions, 0) AS impressions,
       coalesce(c.clicks, 0) AS clicks
FROM impression_counts AS i
FULL OUTER JOIN click_counts AS c
    ON i.platform_category = c.platform_category AND i.minute_start = c.minute_start
ORDER BY 1, 2
