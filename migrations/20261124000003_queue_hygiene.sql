-- apalis.jobs takes one insert and several updates per job and is pruned of
-- finished jobs by the workers' janitor. Vacuum it much sooner than the
-- default 20 % of the table so dead rows never pile up under load.
ALTER TABLE apalis.jobs SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.05,
    fillfactor = 80
);
