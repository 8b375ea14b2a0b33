-- The scheduled job a parked workflow waits with (its deadline or wake-up
-- time): a message makes that job due now instead of enqueuing another.
ALTER TABLE workflows ADD COLUMN wait_job text;
