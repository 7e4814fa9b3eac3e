-- Cost and revenue per campaign: impressions and their spend (sum of bid_price), attributed
-- clicks, what the clicks cost (sum of click_price) and the revenue they bring (sum of
-- click_revenue).
WITH impression_totals AS (
    SELECT campaign_id,
           count(*) AS impressions,
           sum(bid_price) AS spend
    FROM impressions
    GROUP BY 1
),
click_totals AS (
    SELECT campaign_id,
           count(*) AS clicks,
           sum(click_price) AS click_cost,
           sum(click_revenue) AS revenue
    FROM enriched_clicks
    GROUP BY 1
)
SELECT coalesce(i.campaign_id, c.campaign_id) AS campaign_id,
       coalesce(i.impressions, 0) AS impressions,
       coalesce(c.clicks, 0) AS clicks,
       coalesce(i.spend, CAST(0 AS DOUBLE)) AS spend,
       coalesce(c.click_cost, CAST(0 AS DOUBLE)) AS click_cost,
       coalesce(c.revenue, CAST(0 AS DOUBLE)) AS revenue
FROM impression_totals AS i
FULL OUTER JOIN click_totals AS c
    ON i.campaign_id = c.campaign_id
ORDER BY 1
