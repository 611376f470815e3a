DROP TABLE idempotent_results;
