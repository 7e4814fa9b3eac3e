-- The earliest attributed click of each impression. Ties on click_time are broken by click_id,
-- so the answer does not depend on file or row order.
SELECT impression_id,
       click_id,
       ad_id,
       campaign_id,
       publisher_id,
       impression_time,
       click_time,
       engagement_duration,
       platform_category,
       click_price,
       click_revenue
FROM (
    SELECT impression_id,
           click_id,
           ad_id,
           campaign_id,
           publisher_id,
           impression_time,
           click_time,
           engagement_duration,
           platform_category,
           click_price,
           click_revenue,
           row_number() OVER (PARTITION BY impression_id ORDER BY click_time, click_id) AS click_rank
    FROM enriched_clicks
) AS ranked
WHERE click_rank = 1
ORDER BY impression_id
